"""Our model against the original repository's code, same weights, same process, alternating A/B.

The original code is not part of this project: point ``--original`` at a checkout of microsoft/SPACH (its
``models/<family>.py`` is imported by path; it needs ``einops``). Both models get the same weights (the
original state_dict loads into ours unchanged) and their outputs are checked equal first. Then, per round,
each model runs one timed step, the order flipping every round (A B, B A, ...), so that load from other
processes hits both alike; a rate is the median over rounds, and the ratio is ours / original of those medians
(also given: the median of the per-round ratios). Two clocks: wall time, and process CPU time (user + system of
all threads), which on a machine shared with other jobs measures the work a step costs far more steadily.

A training step is forward + cross-entropy + backward + AdamW step (the same optimizer for both);
inference is a forward pass under ``torch.inference_mode``. ``--amp bf16`` runs both under CPU bf16 autocast.
Both run with the allocator settings ``spach train`` applies (``spach.runtime.cpu_tuning``: freed activation
memory is kept for the next step instead of being returned to the kernel and faulted in again); ``--cpu-tuning
off`` measures glibc's defaults.

    python benchmarks/original_ab.py --original /path/to/SPACH --model smlpnet_tiny --mode train
    python benchmarks/original_ab.py --original /path/to/SPACH --model smlpnet_tiny --mode infer --rounds 9
"""
import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import spach
from spach.models import fused
from spach.runtime.cpu_tuning import apply_cpu_tuning, cpu_flags, cpu_model_name

# model name -> (original module file, class, constructor arguments of the original registry function)
ORIGINAL_BUILDERS = {
    "smlpnet_tiny": ("smlp.py", "sMLPNet", dict(dim=80, alpha=3, patch_size=4, depths=[2, 8, 14, 2], dp_rate=0.0)),
    "smlpnet_small": ("smlp.py", "sMLPNet", dict(dim=96, alpha=3, patch_size=4, depths=[2, 10, 24, 2], dp_rate=0.2)),
    "smlpnet_base": ("smlp.py", "sMLPNet", dict(dim=112, alpha=3, patch_size=4, depths=[2, 10, 24, 2], dp_rate=0.3)),
    # the original registry's shiftvit_light_tiny arguments
    "shiftvit_light_tiny": ("shiftvit.py", "ShiftViT", dict(embed_dim=96, depths=(2, 2, 6, 2), mlp_ratio=4,
                                                            drop_path_rate=0.2, n_div=12)),
}


def build_original(root: str, name: str):
    file, cls, kwargs = ORIGINAL_BUILDERS[name]
    path = os.path.join(root, "models", file)
    if not os.path.isfile(path):
        sys.exit(f"--original {root}: no models/{file} there; pass the root of a microsoft/SPACH checkout")
    spec = importlib.util.spec_from_file_location(f"original_{file[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, cls)(**kwargs)


def make_step(model, mode: str, amp, x, y):
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
                model(x)
        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, foreach=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", required=True, help="root of a microsoft/SPACH checkout")
    p.add_argument("--model", default="smlpnet_tiny", choices=sorted(ORIGINAL_BUILDERS))
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each model first")
    p.add_argument("--amp", choices=["off", "bf16"], default="off")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpu-tuning", choices=["on", "off"], default="on",
                   help="the allocator settings `spach train` runs with (spach.runtime.cpu_tuning), for both models "
                   "alike; off: glibc's defaults")
    p.add_argument("--packed-weights", choices=["on", "off"], default="on",
                   help="inference: run ours inside spach.models.fused.packed_weights, as `spach eval` / `predict` / "
                   "`benchmark` do (MLP weights reordered once); off: the same scope with pack=False, the weights "
                   "reordered on every call")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    if args.cpu_tuning == "on":
        tuning = apply_cpu_tuning(threads=args.threads)
    else:
        tuning = {"allocator": "default"}
        if args.threads:
            torch.set_num_threads(args.threads)
    amp = torch.bfloat16 if args.amp == "bf16" else None

    torch.manual_seed(0)
    original = build_original(args.original, args.model)
    ours = spach.create_model(args.model)
    ours.load_state_dict(original.state_dict())  # same names, same shapes: the original layout
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    with torch.no_grad():
        original.eval(), ours.eval()
        diff = (original(x[:2]) - ours(x[:2])).abs().max().item()
    if diff > 1e-4:
        sys.exit(f"outputs differ by {diff:g}: not the same math, nothing to compare")

    steps = {"original": make_step(original, args.mode, amp, x, y), "ours": make_step(ours, args.mode, amp, x, y)}
    packed = args.mode == "infer" and args.packed_weights == "on"
    # inference: ours in the fused MLPs' scope, as `spach eval` runs it
    with fused.packed_weights(ours, pack=packed) if args.mode == "infer" else contextlib.nullcontext():
        if args.mode == "infer":
            with torch.no_grad():
                diff = max(diff, (original(x[:2]) - ours(x[:2])).abs().max().item())
            if diff > 1e-4:
                sys.exit(f"outputs differ by {diff:g} on the fused path")
        for _ in range(args.warmup):
            for s in steps.values():
                s()
        times = {k: [] for k in steps}
        cpu = {k: [] for k in steps}
        order = list(steps)
        for r in range(args.rounds):
            for k in (order if r % 2 == 0 else order[::-1]):
                t0, c0 = time.perf_counter(), time.process_time()
                steps[k]()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = med["original"] / med["ours"]
    cpu_ratio = cpu_med["original"] / cpu_med["ours"]
    per_round = statistics.median(o / u for o, u in zip(times["original"], times["ours"]))
    out = dict(model=args.model, mode=args.mode, amp=args.amp, batch_size=args.batch_size, img_size=args.img_size,
               rounds=args.rounds, threads=torch.get_num_threads(), cpu=cpu_model_name(), cpu_flags=cpu_flags(),
               allocator=tuning.get("allocator"), packed_weights=packed,
               torch=torch.__version__, max_abs_diff=diff,
               img_per_s={k: args.batch_size / v for k, v in med.items()},
               step_s={k: [round(t, 3) for t in v] for k, v in times.items()},
               step_cpu_s={k: [round(t, 3) for t in v] for k, v in cpu.items()},
               speedup=ratio, speedup_median_of_rounds=per_round, speedup_cpu_time=cpu_ratio)
    print(f"{args.model} {args.mode} batch {args.batch_size} {args.img_size}x{args.img_size} amp {args.amp}, "
          f"{out['threads']} threads, {out['cpu']} [{out['cpu_flags']}], allocator {out['allocator']}, "
          f"packed weights {'on' if packed else 'off'}, "
          f"torch {torch.__version__}")
    for k in steps:
        print(f"  {k:9s} median {med[k]:.3f} s/step  {args.batch_size / med[k]:7.2f} img/s  "
              f"(CPU {cpu_med[k]:.2f} s/step)   wall per step: " + " ".join(f"{t:.2f}" for t in times[k]))
    print(f"  speed-up ours/original: wall {ratio:.2f}x (median of per-round ratios {per_round:.2f}x), "
          f"CPU time {cpu_ratio:.2f}x; outputs agree to {diff:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
