"""Side-by-side variants of one model's CPU step in ONE process, timed blocks alternating (A B C A B C ...).

For options whose effect is within one process (torch.compile, SDPA vs explicit attention, channels-last,
fused vs foreach AdamW, bf16); the allocator settings and memory are measured by cpu_train.py instead, one
process per configuration. Ratios are against the first variant.

    python benchmarks/cpu_variants.py --model spach_ms_xxs_patch4_224_attn --variants plain,sdpa-bf16,bf16
    python benchmarks/cpu_variants.py --model spach_ms_xxs_patch4_224_conv --variants plain,compile,bf16,bf16-compile

Variants: plain (fp32, foreach AdamW), fused (fp32, fused AdamW), bf16 (the default: explicit softmax attention in
bf16 CPU training), compile, bf16-compile, cl (channels-last), bf16-cl, explicit (fp32, explicit softmax attention),
explicit-bf16 (= bf16 in train mode; inference keeps SDPA), sdpa-bf16 (bf16 with SDPA attention in training too),
plain-mlp (fp32, the channel MLPs' plain addmm + activation in inference instead of oneDNN's fused epilogue),
unpacked (fp32 inference with the fused MLPs' weights reordered on every call instead of once:
spach.models.fused.packed_weights(model, pack=False)).
"""
import argparse
import json
import os
import sys
import time

VARIANTS = {
    "plain": dict(amp="off", fused_optimizer=False),
    "fused": dict(amp="off"),
    "bf16": dict(amp="bf16"),
    "sdpa-bf16": dict(amp="bf16", cpu_bf16_explicit_attn=False),
    "compile": dict(amp="off", compile=True),
    "bf16-compile": dict(amp="bf16", compile=True),
    "cl": dict(amp="off", channels_last=True),
    "bf16-cl": dict(amp="bf16", channels_last=True),
    "explicit": dict(amp="off", fused_attn=False),
    "plain-mlp": dict(amp="off", fused_mlp=False),
    "unpacked": dict(amp="off", packed_weights=False),
    "explicit-bf16": dict(amp="bf16", fused_attn=False),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="spach_ms_xxs_patch4_224_conv")
    ap.add_argument("--variants", default="plain,fused,bf16")
    ap.add_argument("--mode", default="train", choices=["train", "infer"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    from spach.runtime.cpu_tuning import cpu_model_name, set_threads
    from spach.bench.runner import BenchConfig, run_interleaved
    threads = set_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    cfgs = [BenchConfig(model=args.model, mode=args.mode, batch_size=args.batch_size, steps=args.steps,
                        warmup=args.warmup, repeats=args.repeats, label=n, **VARIANTS[n]) for n in names]
    t0 = time.time()
    results = run_interleaved(cfgs, args.repeats)
    total = time.time() - t0
    base, base_cpu = results[0]["img_per_s"], results[0]["img_per_cpu_s"]
    print(f"# {cpu_model_name()}, {threads} threads, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"{args.model} {args.mode} batch {args.batch_size}: {args.repeats} alternating blocks x {args.steps} steps "
          f"after {args.warmup} warm-up steps (compilation included there); run took {total:.0f} s")
    print(f"{'variant':14s} {'img/s':>7s} {'x first':>7s} {'img/cpu-s':>9s} {'x first':>7s}")
    for r in results:
        print(f"{r['label']:14s} {r['img_per_s']:7.2f} {r['img_per_s'] / base:7.2f} {r['img_per_cpu_s']:9.2f} "
              f"{r['img_per_cpu_s'] / base_cpu:7.2f}   {[round(v, 1) for v in r['img_per_cpu_s_blocks']]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, seconds=total), f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
