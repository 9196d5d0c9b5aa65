"""CPU training-step (or inference) throughput and memory: the plain fp32 eager path against the tuned paths.

Every configuration runs as its own ``spach benchmark`` process (so that peak memory and the allocator settings
belong to that configuration alone), and the configurations alternate in rounds (A B C, A B C, ...) so that load
from other processes on a shared machine hits all of them alike. Each process warms up, then times ``--blocks``
blocks of ``--steps`` steps; a configuration's rate is the median over all its blocks of all rounds, and each
ratio is against the plain path of the same model from the same run. Two rates are reported: wall-clock img/s,
and img per CPU-second per thread (process CPU time, user + system, so page faults count), which is what the
threads achieve while they run and is far less disturbed by other jobs on a shared machine.

Training configurations (``--mode train``):
  plain      fp32, explicit softmax attention, foreach AdamW, glibc malloc defaults
                                                                  (the plain eager path: the original's op sequence)
  plain-sdpa as plain, but SDPA attention (our models' default)   (attention models only: a second reference)
  fp32-opt   fp32, SDPA, fused AdamW, malloc settings             (every math-preserving trick that helps)
  bf16       bf16 autocast, fused AdamW, malloc settings          (the CPU default of `spach train` on bf16 CPUs)
Memory (one extra process per configuration, 1 step, glibc set to return freed memory at once so that the peak
resident set measures what the step holds): plain, fp32-opt, bf16, and fp32 / bf16 with --grad-checkpointing.
Inference (``--mode infer``): plain fp32, fp32 + malloc thresholds, bf16 + malloc thresholds.

    python benchmarks/cpu_train.py [--models a,b] [--batch-size 16] [--rounds 2] [--json out.json]
    python benchmarks/cpu_train.py --mode infer
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

DEFAULT_MODELS = ["spach_ms_xxs_patch4_224_conv", "spach_ms_xxs_patch4_224_attn", "spach_ms_xxs_patch4_224_mlp",
                  "spach_ms_s_patch4_224_hybrid"]
# batch per model: the measurement sizes (16 for XXS, 4 for S)
DEFAULT_BATCH = {"spach_ms_s_patch4_224_hybrid": 4, "spach_ms_s_patch4_224_conv": 4, "spach_ms_s_patch4_224_attn": 4,
                 "spach_ms_s_patch4_224_mlp": 4}

TRAIN_CONFIGS = {
    "plain": ["--amp", "off", "--no-fused-optimizer", "--no-cpu-tuning", "--no-fused-attn"],
    "plain-sdpa": ["--amp", "off", "--no-fused-optimizer", "--no-cpu-tuning"],
    "fp32-opt": ["--amp", "off"],
    "bf16": ["--amp", "bf16"],
}
# Memory runs: one process each, with glibc returning every freed block of 128 KiB or more to the kernel at
# once (fixed mmap threshold), so the resident set tracks the memory the step really holds; with glibc's
# defaults or the tuned thresholds it also holds freed heap memory, which hides what the math needs.
MEMORY_CONFIGS = {
    "plain": ["--amp", "off", "--no-fused-optimizer"],
    "fp32-opt": ["--amp", "off"],
    "bf16": ["--amp", "bf16"],
    "fp32-ckpt": ["--amp", "off", "--grad-checkpointing"],
    "bf16-ckpt": ["--amp", "bf16", "--grad-checkpointing"],
}
STRICT_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# configurations that differ from "plain" only in the attention kernel: run for models with attention blocks
ATTENTION_ONLY = {"plain-sdpa"}
INFER_CONFIGS = {
    "plain": ["--amp", "off", "--no-cpu-tuning"],
    "fp32-opt": ["--amp", "off"],
    "bf16": ["--amp", "bf16"],
}


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor()


def has_attention(model: str) -> bool:
    from spach.models import MODEL_CONFIGS
    from spach.models.spach import stage_archs
    return any(kind == "attn" for stage in stage_archs(MODEL_CONFIGS[model]["net_arch"]) for kind, _ in stage)


def run_one(model, mode, batch, extra, steps, warmup, blocks, threads, env):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, "-m", "spach", "benchmark", "--model", model, "--mode", mode, "--batch-size", str(batch),
           "--device", "cpu", "--steps", str(steps), "--warmup", str(warmup), "--repeats", str(blocks),
           "--json", path] + (["--threads", str(threads)] if threads else []) + extra
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    with open(path) as f:
        r = json.load(f)["results"][0]
    os.unlink(path)
    r["command"] = "spach " + " ".join(cmd[3:]).replace(f" --json {path}", "")
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="train", choices=["train", "infer"])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--batch-size", type=int, default=None, help="default: 16 for XXS models, 4 for S models")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=2, help="timed blocks per process")
    ap.add_argument("--steps", type=int, default=None, help="steps per block (default 2 train, 4 infer)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the grad-checkpointing memory runs")
    ap.add_argument("--memory-only", action="store_true", help="only the memory runs")
    ap.add_argument("--memory-batch", type=int, default=None, help="batch of the memory runs (default: --batch-size)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.mode == "train" else 4)
    env = dict(os.environ)
    # Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning threads
    # steal the cores the other thread needs (measured 2x slower at 2 threads). Same setting for every config.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    configs = TRAIN_CONFIGS if args.mode == "train" else INFER_CONFIGS
    import torch
    machine = dict(cpu=lscpu_model(), cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                   omp_wait_policy=env["OMP_WAIT_POLICY"])
    print(f"# {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}")
    report = dict(machine=machine, mode=args.mode, rounds=args.rounds, blocks=args.blocks, steps=steps, models={})
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        batch = args.batch_size or DEFAULT_BATCH.get(model, 16)
        attn = has_attention(model)
        runs = {name: [] for name in configs if attn or name not in ATTENTION_ONLY}
        for _ in range(0 if args.memory_only else args.rounds):
            for name in runs:
                extra = configs[name]
                runs[name].append(run_one(model, args.mode, batch, extra, steps, args.warmup, args.blocks,
                                          args.threads, env))
        memory = {}
        if args.mode == "train" and not args.no_memory:
            menv = dict(env, **STRICT_MALLOC_ENV)
            for name, extra in MEMORY_CONFIGS.items():
                r = run_one(model, args.mode, args.memory_batch or batch, extra + ["--no-cpu-tuning"], 1, 1, 1,
                            args.threads, menv)
                memory[name] = dict(step_mem_mb=r["peak_mem_mb"] - r["base_rss_mb"], peak_rss_mb=r["peak_mem_mb"],
                                    command="env MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 "
                                            + r["command"])
            for name, row in memory.items():
                row["vs_plain"] = row["step_mem_mb"] / memory["plain"]["step_mem_mb"]
        rows = {}
        for name, rs in runs.items():
            if not rs:
                continue
            rates = [v for r in rs for v in r["img_per_s_blocks"]]
            cpu_rates = [v for r in rs for v in r["img_per_cpu_s_blocks"]]
            train_mem = [r["peak_mem_mb"] - r["base_rss_mb"] for r in rs]
            rows[name] = dict(img_per_s=statistics.median(rates), blocks=[round(v, 2) for v in rates],
                              img_per_cpu_s=statistics.median(cpu_rates), cpu_blocks=[round(v, 2) for v in cpu_rates],
                              step_ms=statistics.median(r["step_ms"] for r in rs),
                              peak_rss_mb=statistics.median(r["peak_mem_mb"] for r in rs),
                              train_mem_mb=statistics.median(train_mem), command=rs[0]["command"],
                              tflops=statistics.median(r["tflops"] for r in rs))
        plain = rows.get("plain")
        for name, row in (rows.items() if plain else ()):
            row["speedup"] = row["img_per_s"] / plain["img_per_s"]
            row["speedup_cpu"] = row["img_per_cpu_s"] / plain["img_per_cpu_s"]
            row["mem_ratio"] = row["train_mem_mb"] / plain["train_mem_mb"]
            if "plain-sdpa" in rows:
                row["speedup_cpu_vs_sdpa"] = row["img_per_cpu_s"] / rows["plain-sdpa"]["img_per_cpu_s"]
        report["models"][model] = dict(batch=batch, memory_batch=args.memory_batch or batch, configs=rows,
                                       memory=memory)
        print(f"\n{model}  {args.mode}  batch {batch}  ({args.rounds} rounds x {args.blocks} blocks x {steps} steps)"
              + (f", memory runs at batch {args.memory_batch}" if args.memory_batch else ""))
        print(f"{'config':10s} {'img/s':>7s} {'x plain':>7s} {'img/cpu-s':>9s} {'x plain':>7s} {'step ms':>8s} "
              f"{'peak RSS MB':>11s} {'step mem MB':>11s}  wall-clock blocks / cpu-time blocks")
        for name, row in rows.items():
            print(f"{name:10s} {row['img_per_s']:7.2f} {row['speedup']:7.2f} {row['img_per_cpu_s']:9.2f} "
                  f"{row['speedup_cpu']:7.2f} {row['step_ms']:8.0f} {row['peak_rss_mb']:11.0f} "
                  f"{row['train_mem_mb']:11.0f}  {row['blocks']} / {row['cpu_blocks']}"
                  + (f"  (cpu-time x plain-sdpa {row['speedup_cpu_vs_sdpa']:.2f})"
                     if "speedup_cpu_vs_sdpa" in row else ""))
        if memory:
            print("memory (strict accounting): " + ", ".join(
                f"{k} {v['step_mem_mb']:.0f} MB ({v['vs_plain']:.2f}x)" for k, v in memory.items()))
        sys.stdout.flush()
    print("\nimg/s = wall clock; img/cpu-s = images per second of process CPU time per thread (the rate with the "
          "cores to itself; robust to other jobs on a shared machine)")
    print("step mem = peak resident set during the measured steps minus the resident set before the model was "
          "built (parameters, gradients, optimiser state, activations, and in the speed rows the allocator's "
          "retained heap)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
