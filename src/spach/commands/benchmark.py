"""Measure training-step and inference throughput of SPACH models.

Warm-up steps are neither counted nor timed; each timed block is device-synchronised at both ends; the rate is
the median over blocks. Reports images/s, step time, peak memory (resident set on CPU, max allocated on GPU),
achieved TFLOP/s from the analytic FLOPs (training = 3x forward) and, on known GPUs, the share of the dense
bf16 peak (MFU). ``--data DIR`` measures end to end from JPEG files through a DataLoader; ``--loader --data DIR
--data-set WDS --against FOLDER`` the loader alone, from shards against the same images as an ImageFolder.

Example: spach benchmark --model spach_ms_xxs_patch4_224_conv --mode both --batch-size 16 --device cpu
"""
import json
import os
import platform
import sys

from ..errors import SpachError
from ..train.args import add_shared_flags

__all__ = ["add_arguments", "run", "configs_from_args"]


def add_arguments(parser):
    parser.add_argument("--model", default=None,
                        help="model name, or several separated by commas (see `spach models`); not with --loader")
    parser.add_argument("--mode", default="train", choices=["train", "infer", "both"])
    # shared with `spach train`: one spelling, default and validation (compile time is excluded from the timing)
    add_shared_flags(parser, ("batch_size", "grad_accum_steps", "device", "amp", "channels_last", "compile",
                              "grad_checkpointing"))
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (random tensors on the device) or a folder of JPEGs (ImageFolder; "
                             "its train/ split if present) read through the real DataLoader")
    parser.add_argument("--data-pipeline", dest="data_pipeline", default="fast", choices=["fast", "timm", "nvjpeg"],
                        help="with --data DIR: 'fast' = `spach train --data-pipeline fast` (CPU workers: OpenCV "
                             "decoding + DeiT RandAugment, uint8 to the device, normalise + erasing there); 'timm' "
                             "= the plain timm/PIL loader; 'nvjpeg' = GPU decoding (workers only read files; no "
                             "RandAugment), CUDA only")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers with --data DIR; "
                        "None: the available cores")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads; None: the available cores")
    parser.add_argument("--img-size", dest="img_size", type=int, default=224)
    parser.add_argument("--num-classes", dest="num_classes", type=int, default=1000)
    parser.add_argument("--no-mixup", dest="mixup", action="store_false",
                        help="hard labels with label smoothing instead of DeiT's mixup/cutmix soft targets")
    parser.add_argument("--no-fused-optimizer", dest="fused_optimizer", action="store_false",
                        help="foreach AdamW instead of the fused kernel")
    parser.add_argument("--no-fused-attn", dest="fused_attn", action="store_false",
                        help="explicit softmax attention instead of scaled_dot_product_attention")
    parser.add_argument("--no-cpu-tuning", dest="cpu_tuning", action="store_false",
                        help="leave glibc malloc thresholds at their defaults")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    g = parser.add_argument_group("the data loader alone (--loader)")
    g.add_argument("--loader", action="store_true",
                   help="measure the loader alone with --data DIR: images/s of one reader process (one loader core) "
                        "through the trainer's dataset and DeiT train transform, no model")
    g.add_argument("--data-set", "--data_set", dest="data_set", default="IMNET", choices=["IMNET", "WDS", "HFDS"],
                   help="format of --data, as for `spach train`")
    g.add_argument("--against", default=None, metavar="DIR",
                   help="also measure this ImageFolder (the same images), alternating with --data round by round")
    g.add_argument("--read-latency-ms", dest="read_latency_ms", type=float, default=0.0,
                   help="simulated storage latency: every read request (up to 1 MiB) waits this long")
    g.add_argument("--images", type=int, default=256, help="images per round")
    g.add_argument("--rounds", type=int, default=3, help="rounds (the median is reported)")


def _default_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def configs_from_args(args):
    from ..runtime.device import default_amp
    from ..bench.runner import BenchConfig
    from ..models import MODEL_CONFIGS, UnknownModelError
    from ..models.variants import unknown_model_message

    if not args.model:
        raise SpachError("--model is required (or --loader to measure the data loader alone)")
    names = [n.strip() for n in args.model.split(",") if n.strip()]
    if not names:
        raise SpachError("--model is empty: name at least one model (see `spach models`)")
    for n in names:
        if n not in MODEL_CONFIGS:
            raise UnknownModelError(unknown_model_message(n))
    for flag in ("steps", "repeats"):
        if getattr(args, flag) < 1:
            raise SpachError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    if args.warmup < 0:
        raise SpachError(f"--warmup must be 0 or more (got {args.warmup})")
    device = args.device or _default_device()
    kind = device.split(":")[0]
    batch = args.batch_size if args.batch_size is not None else (128 if kind == "cuda" else 16)
    if batch < 1:
        raise SpachError(f"--batch-size must be at least 1 (got {batch})")
    amp = args.amp or default_amp(kind)
    if args.data != "synthetic" and not os.path.isdir(args.data):
        raise SpachError(f"--data {args.data!r} is neither 'synthetic' nor an existing folder of images")
    workers = args.workers
    if workers is None:
        try:
            workers = len(os.sched_getaffinity(0))
        except AttributeError:
            workers = os.cpu_count() or 1
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    cfgs = []
    for name in names:
        for mode in modes:
            cfgs.append(BenchConfig(
                model=name, mode=mode, batch_size=batch, device=device, amp=amp, channels_last=args.channels_last,
                compile=args.compile, grad_checkpointing=args.grad_checkpointing and mode == "train",
                grad_accum_steps=(args.grad_accum_steps or 1) if mode == "train" else 1,
                fused_optimizer=args.fused_optimizer, fused_attn=args.fused_attn, data=args.data,
                data_pipeline=args.data_pipeline, workers=workers, steps=args.steps, warmup=args.warmup,
                repeats=args.repeats, img_size=args.img_size, num_classes=args.num_classes, mixup=args.mixup))
    return cfgs


def _batch(r) -> str:
    """The batch per step: ``8x4`` for 4 accumulated micro-batches of 8."""
    accum = r.get("grad_accum_steps", 1)
    return f"{r['batch_size']}x{accum}" if accum > 1 else str(r["batch_size"])


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(results, file=None):
    file = file or sys.stdout
    header = (f"{'model':34s} {'mode':5s} {'batch':>5s} {'amp':>4s} {'img/s':>9s} {'step ms':>9s} "
              f"{'peak MB':>9s} {'TFLOP/s':>8s} {'MFU %':>6s}")
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in results:
        print(f"{r['model']:34s} {r['mode']:5s} {_batch(r):>5s} {r['amp']:>4s} {r['img_per_s']:9.1f} "
              f"{r['step_ms']:9.1f} {_fmt(r['peak_mem_mb'], '9.0f')} {r['tflops']:8.3f} "
              f"{_fmt(r['mfu_pct'], '6.1f')}", file=file)
    if results:
        r = results[0]
        mem = "max allocated" if r["mem_kind"] == "max_allocated" else "peak resident set of the process"
        print(f"device: {r['device_name']}; torch {r['torch']}; {r['steps']} steps x {r['repeats']} blocks "
              f"(median) after {r['warmup']} warm-up steps; memory = {mem}", file=file)


def run_loader(args) -> int:
    from ..bench.loader_speed import run_loader_benchmark
    from ..runtime.cpu_tuning import cpu_flags, cpu_model_name as cpu_name
    if args.data == "synthetic" or not os.path.isdir(args.data):
        raise SpachError(f"--loader needs --data DIR, an existing dataset folder (got {args.data!r})")
    if args.against and not os.path.isdir(args.against):
        raise SpachError(f"--against {args.against!r} is not a folder: pass the ImageFolder with the same images")
    if args.images < 1 or args.rounds < 1:
        raise SpachError("--images and --rounds must be at least 1")
    pairs = [(args.data_set, args.data)] + ([("IMNET", args.against)] if args.against else [])
    if len({k for k, _ in pairs}) < len(pairs):
        raise SpachError("--against compares another format with the ImageFolder: pass --data-set WDS or HFDS")
    results = run_loader_benchmark(pairs, args.images, args.rounds, args.img_size, args.read_latency_ms)
    print(f"{'data':6s} {'img/s per loader core':>22s} {'img per CPU-s':>14s}  rounds")
    for r in results:
        print(f"{r['kind']:6s} {r['img_per_s_median']:22.1f} {r['img_per_cpu_s_median']:14.1f}  "
              + " ".join(f"{x:.1f}" for x in r["img_per_s_rounds"]))
    if len(results) == 2:
        print(f"ratio {results[0]['kind']} / {results[1]['kind']}: "
              f"{results[0]['img_per_s_median'] / results[1]['img_per_s_median']:.2f}x")
    print(f"{args.images} images per round, median of {args.rounds} alternating rounds, DeiT train transform at "
          f"{args.img_size}, read latency {args.read_latency_ms:g} ms per request (<= 1 MiB); CPU {cpu_name()} "
          f"({cpu_flags()})")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({"cpu": cpu_name(), "cpu_flags": cpu_flags(), "results": results}, f, indent=2)
        except OSError as e:
            raise SpachError(f"cannot write --json {args.json!r}: {e.strerror}") from None
    return 0


def run(args) -> int:
    if args.loader:
        return run_loader(args)
    if args.data_set != "IMNET":
        raise SpachError(f"--data-set {args.data_set} is measured with --loader (the loader alone): add --loader")
    import torch
    from ..runtime.cpu_tuning import apply_cpu_tuning
    from ..bench.runner import run_benchmark

    cfgs = configs_from_args(args)
    tuning = None
    if cfgs[0].device.split(":")[0] == "cpu" or args.threads:
        if args.cpu_tuning:
            tuning = apply_cpu_tuning(threads=args.threads)
        elif args.threads:
            torch.set_num_threads(args.threads)
    results = []
    for cfg in cfgs:
        r = run_benchmark(cfg)
        r["cpu_tuning"] = tuning
        results.append(r)
    print_table(results)
    if args.json:
        payload = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                               "torch": torch.__version__, "device_name": results[0]["device_name"]},
                   "results": results}
        try:
            with open(args.json, "w") as f:
                json.dump(payload, f, indent=2, default=str)
        except OSError as e:
            raise SpachError(f"cannot write --json {args.json!r}: {e.strerror}") from None
    return 0
