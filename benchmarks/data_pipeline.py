"""Decode + augment throughput per worker: timm's DeiT transform (PIL) vs spach's fast pipeline.

Generates a set of realistic JPEGs (500x375, quality 90: smooth gradients, shapes, blur and sensor-like noise,
so entropy decoding costs what it costs on photos), then times both pipelines on one thread in one process,
alternating passes over the same files (so load from other processes hits both alike), and reports the median
images per second of the process's CPU time (one thread, so images per core-second; wall-clock rates are
printed too) and the ratio. The fast pipeline's time includes its device-side finishing step (normalise + random
erasing, here on the CPU, batched by 64) so both produce the same normalised float tensors; a third line times the
worker side alone (uint8 out), which is what a loader worker does when the normalisation runs on a GPU, and a fourth
the fast pipeline without its OpenCV kernels (PIL decoding and RandAugment ops), when OpenCV is installed.

    python benchmarks/data_pipeline.py [--images 96] [--repeats 5] [--size 500x375] [--json out.json]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter


def make_photo(rng, w=500, h=375) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, ph = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 80 * np.sin(a * xx / 60 + b * yy / 45 + ph * 6) + 40 * (xx / w - 0.5) * rng.uniform(-1, 1)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(5, 15))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(10, 150))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=col)
    pil = pil.filter(ImageFilter.GaussianBlur(1.2))
    arr = np.asarray(pil).astype(np.float32) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_dataset(root: str, n: int, size=(500, 375), classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        d = os.path.join(root, "train", f"class{i % classes}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"img{i:05d}.jpg")
        make_photo(rng, *size).save(p, quality=90)
        paths.append(p)
    return paths


def timm_transform(size=224):
    """The baseline: the trainer's own timm/PIL DeiT transform (`spach train --data-pipeline timm`)."""
    from spach.data.transforms import build_transform
    return build_transform(True, size)


def _load_rgb(path):
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def run_timm(paths, tf, batch=64):
    """Batches as a loader makes them: per-image transform, then the collate (stack)."""
    return [torch.stack([tf(_load_rgb(p)) for p in paths[k:k + batch]]) for k in range(0, len(paths), batch)]


def run_fast(paths, tf, finalize, batch=64):
    """Per-image worker transform, collate, then the batched finishing step (normalise + erase) if given."""
    outs = []
    for k in range(0, len(paths), batch):
        x = torch.stack([tf(p) for p in paths[k:k + batch]])
        outs.append(finalize(x) if finalize is not None else x)
    return outs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", default="500x375", help="WxH of the generated JPEGs")
    ap.add_argument("--dir", default=None, help="use (or fill) this folder instead of a temporary one")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default malloc thresholds")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one worker = one core
    from spach.runtime.cpu_tuning import cpu_model_name, tune_glibc_malloc
    # the malloc settings `spach train` applies on a CPU (heap only), for both pipelines alike (fresh float
    # batches otherwise page-fault on every allocation)
    malloc_tuned = tune_glibc_malloc(disable_mmap=True) if not args.no_malloc_tuning else False
    from spach.data.fast_pipeline import DeviceNormalize, build_fast_train_transform

    w, h = (int(v) for v in args.size.lower().split("x"))
    tmp = None
    root = args.dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="spach-jpeg-")
        root = tmp.name
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs if f.endswith(".jpg"))
    if len(paths) < args.images:
        paths = make_dataset(root, args.images, (w, h))
    paths = paths[:args.images]
    mean_kb = statistics.mean(os.path.getsize(p) for p in paths) / 1024

    timm_tf = timm_transform()
    fast_tf = build_fast_train_transform(224)
    from spach.data import cv_augment
    opencv = cv_augment.available()
    pil_tf = build_fast_train_transform(224, use_cv2=False) if opencv else None
    finalize = DeviceNormalize()
    # warm-up (imports, first-call allocations)
    run_timm(paths[:8], timm_tf)
    run_fast(paths[:8], fast_tf, finalize)
    names = ("timm", "fast", "fast_worker") + (("fast_pil",) if pil_tf is not None else ())
    rates = {k: [] for k in names}
    wall = {k: [] for k in names}
    for _ in range(args.repeats):
        for name in names:
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "timm":
                y = run_timm(paths, timm_tf)
            elif name == "fast_pil":
                y = run_fast(paths, pil_tf, finalize)
            else:
                y = run_fast(paths, fast_tf, finalize if name == "fast" else None)
            c1, t1 = time.process_time(), time.perf_counter()
            rates[name].append(len(paths) / (c1 - c0))
            wall[name].append(len(paths) / (t1 - t0))
            assert sum(b.shape[0] for b in y) == len(paths) and all(b.shape[1:] == (3, 224, 224) for b in y)
            assert all(b.dtype == (torch.uint8 if name == "fast_worker" else torch.float32) for b in y)
    med = {k: statistics.median(v) for k, v in rates.items()}
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    ratios = [f / t for f, t in zip(rates["fast"], rates["timm"])]
    result = dict(
        machine=dict(cpu=cpu_model_name(), cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                     pillow=Image.__version__, opencv=cv_augment.cv2.__version__ if opencv else None),
        malloc_tuned=malloc_tuned, images=len(paths), image_size=f"{w}x{h}", mean_file_kb=round(mean_kb, 1), threads=1, repeats=args.repeats,
        timing="CPU time of the process (one thread): images per core-second, immune to other processes' load",
        timm_img_per_s=med["timm"], fast_img_per_s=med["fast"], ratio=med["fast"] / med["timm"],
        fast_worker_img_per_s=med["fast_worker"], worker_ratio=med["fast_worker"] / med["timm"],
        timm_wall_img_per_s=med_wall["timm"], fast_wall_img_per_s=med_wall["fast"],
        wall_ratio=med_wall["fast"] / med_wall["timm"],
        ratio_per_pass_median=statistics.median(ratios), timm_runs=rates["timm"], fast_runs=rates["fast"])
    if pil_tf is not None:
        result.update(fast_pil_img_per_s=med["fast_pil"], pil_ratio=med["fast_pil"] / med["timm"])
    print(f"{len(paths)} JPEGs {w}x{h} q90 (mean {mean_kb:.0f} KiB), 1 thread, {args.repeats} alternating passes, "
          f"malloc tuned: {malloc_tuned}")
    print(f"timm/PIL DeiT transform : {med['timm']:7.1f} img/s per worker  (runs {[round(r) for r in rates['timm']]})")
    print(f"spach fast pipeline     : {med['fast']:7.1f} img/s per worker  (runs {[round(r) for r in rates['fast']]})")
    print(f"ratio fast / timm       : {result['ratio']:.2f}x (median of per-pass ratios {result['ratio_per_pass_median']:.2f}x)")
    print(f"fast, worker side only  : {med['fast_worker']:7.1f} img/s per worker  = {result['worker_ratio']:.2f}x timm "
          f"(normalise + erase on the training device, as on a GPU)")
    if pil_tf is not None:
        print(f"fast, without OpenCV    : {med['fast_pil']:7.1f} img/s per worker  = {result['pil_ratio']:.2f}x timm "
              f"(PIL decoding and RandAugment ops)")
    else:
        print("(OpenCV is not installed: the fast pipeline ran with PIL decoding and RandAugment ops)")
    print(f"(img/s per core-second of CPU time; wall clock: timm {med_wall['timm']:.1f}, fast {med_wall['fast']:.1f}, "
          f"ratio {result['wall_ratio']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
