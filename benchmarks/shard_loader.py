"""Loader images/s per core: WebDataset shards against the same images as an ImageFolder, on local disk and with a
simulated per-request storage latency.

Writes realistic JPEGs (data_pipeline.py's generator: 500x375, quality 90), packs them with `spach pack`, then
runs `spach benchmark --loader` in-process for each latency: one reader (one core) per format, the trainer's
datasets and DeiT train transform at 224, the formats alternating round by round (A B, B A, ...) so that load from
other processes hits both alike, the median of the rounds. The latency is added by a delayed file reader in the
benchmark only (spach.bench.loader_speed): each read request of up to 1 MiB waits first, so a loose JPEG costs one
request and a shard one per MiB.

    python benchmarks/shard_loader.py [--images 400] [--rounds 5] [--latency-ms 0 2 10] [--json out.json]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400, help="JPEGs written and read per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 2.0, 10.0])
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--workdir", default=None, help="where the images and shards go (default: a temp folder)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from data_pipeline import make_dataset
    from spach.bench.loader_speed import run_loader_benchmark
    from spach.runtime.cpu_tuning import cpu_flags, cpu_model_name as cpu_name
    from spach.data.pack import pack_imagefolder

    work = a.workdir or tempfile.mkdtemp(prefix="spach-shard-bench-")
    folder, shards = os.path.join(work, "folder"), os.path.join(work, "shards")
    if not os.path.isdir(os.path.join(folder, "train")):
        make_dataset(folder, a.images)
    pack_imagefolder(folder, shards, shard_size=a.shard_size, splits=("train",), show_progress=False)
    size_mb = sum(os.path.getsize(os.path.join(shards, n)) for n in os.listdir(shards) if n.endswith(".tar")) / 2**20
    print(f"{a.images} JPEGs ({size_mb / a.images * 1024:.0f} KiB each), shards of {a.shard_size}; CPU {cpu_name()} "
          f"({cpu_flags()}); other processes share this machine: compare the ratios, not the absolute rates")
    rows = []
    for lat in a.latency_ms:
        res = run_loader_benchmark([("WDS", shards), ("IMNET", folder)], a.images, a.rounds, 224, lat)
        wds, imnet = res
        ratio = wds["img_per_s_median"] / imnet["img_per_s_median"]
        # the two readers of a round ran back to back: their ratio sees the same load
        paired = statistics.median(a / b for a, b in zip(wds["img_per_s_rounds"], imnet["img_per_s_rounds"]))
        cpu = statistics.median(a / b for a, b in zip(wds["img_per_cpu_s_rounds"], imnet["img_per_cpu_s_rounds"]))
        print(f"latency {lat:5.1f} ms/request: shards {wds['img_per_s_median']:7.1f} img/s, folder "
              f"{imnet['img_per_s_median']:7.1f} img/s per loader core -> {ratio:.2f}x (per-round ratio median "
              f"{paired:.2f}x; CPU time per image {cpu:.2f}x: shards {wds['img_per_cpu_s_median']:.1f}, folder "
              f"{imnet['img_per_cpu_s_median']:.1f} img per CPU-s)\n    rounds, img/s: shards "
              + " ".join(f"{x:.1f}" for x in wds["img_per_s_rounds"]) + "; folder "
              + " ".join(f"{x:.1f}" for x in imnet["img_per_s_rounds"]))
        rows.append({"read_latency_ms": lat, "shards": wds, "folder": imnet, "ratio": ratio, "paired_ratio": paired,
                     "cpu_ratio": cpu})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu_name(), "cpu_flags": cpu_flags(), "images": a.images, "rounds": a.rounds,
                       "shard_size": a.shard_size, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
