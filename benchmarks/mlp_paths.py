"""ShiftViT-light-T's channel MLPs in inference, one per stage at batch 32, in the forms of the fused path.

Per stage, in one process with the forms alternating call by call (so that load from other processes hits them
alike), median milliseconds of ``--repeats`` calls after one warm-up call each:

- ``reorder``: the fused MLP with its weights reordered into oneDNN's layout on every call
  (``spach.models.fused.packed_weights(mlp, pack=False)``);
- ``packed``: the same inside ``packed_weights`` (reordered once);
- ``packed + add``: ``residual + mlp(x)``, the sum as a pass of its own;
- ``packed, sum in epilogue``: ``mlp.forward_residual(x, residual)``, the sum in fc2's epilogue.

The network total weights each stage by its block count (2, 2, 6, 2). Random activations: the products' speed
does not depend on the values. Run with the allocator setting ``spach train`` applies.

A second table gives each stage's fc1 product (packed weights) with GELU in its epilogue and without, in GFLOP/s,
beside a square product (``--square``, 4096): what the products reach on this CPU, and what the activation costs.

    python benchmarks/mlp_paths.py [--threads 2] [--repeats 15] [--batch 32]
"""
import argparse
import copy
import statistics
import sys
import time

import torch

STAGES = [(96, 56, 2), (192, 28, 2), (384, 14, 6), (768, 7, 2)]  # width, grid, blocks of shiftvit_light_tiny


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--square", type=int, default=4096, help="size of the square reference product")
    args = ap.parse_args(argv)
    from spach.models import fused
    from spach.models.shiftvit import ShiftMlp
    from spach.runtime.cpu_tuning import apply_cpu_tuning, cpu_flags, cpu_model_name
    apply_cpu_tuning(args.threads)
    print(f"# {cpu_model_name()} [{cpu_flags()}], {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"batch {args.batch}")
    forms = ["reorder", "packed", "packed + add", "packed, sum in epilogue"]
    print(f"{'stage (width, grid)':22s}" + "".join(f"{f:>25s}" for f in forms))
    totals = dict.fromkeys(forms, 0.0)
    torch.manual_seed(0)
    with torch.inference_mode():
        for width, grid, blocks in STAGES:
            mlp = ShiftMlp(width, 4 * width).eval()
            x = torch.randn(args.batch, width, grid, grid).contiguous(memory_format=torch.channels_last)
            residual = torch.randn_like(x)
            outside = copy.deepcopy(mlp)  # the same weights, in a scope that does not pack
            calls = {"reorder": lambda: outside(x), "packed": lambda: mlp(x), "packed + add": lambda: residual + mlp(x),
                     "packed, sum in epilogue": lambda: mlp.forward_residual(x, residual)}
            times = {f: [] for f in forms}
            with fused.packed_weights(mlp), fused.packed_weights(outside, pack=False):
                for r in range(args.repeats + 1):
                    for f in (forms if r % 2 == 0 else forms[::-1]):
                        t = time.perf_counter()
                        calls[f]()
                        dt = time.perf_counter() - t
                        if r:  # the first round is the warm-up (the packing included)
                            times[f].append(dt)
            med = {f: statistics.median(v) * 1e3 for f, v in times.items()}
            for f in forms:
                totals[f] += med[f] * blocks
            print(f"{f'{width}, {grid}x{grid} (x{blocks})':22s}" + "".join(f"{med[f]:25.2f}" for f in forms))
    print(f"{'network (ms)':22s}" + "".join(f"{totals[f]:25.1f}" for f in forms))
    print(f"packed / reorder: {totals['reorder'] / totals['packed']:.3f}x faster; sum in epilogue / own pass: "
          f"{totals['packed + add'] / totals['packed, sum in epilogue']:.3f}x faster")
    products(args)
    return 0


def products(args):
    lp = torch.ops.mkldnn._linear_pointwise
    cases = []
    for width, grid, _ in STAGES:
        x = torch.randn(args.batch * grid * grid, width)
        w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(4 * width, width) * 0.05)
        b = torch.randn(4 * width)
        flops = 2 * x.shape[0] * width * 4 * width
        cases.append((f"fc1 {width} -> {4 * width}, {grid}x{grid}", flops, {
            "no activation": lambda x=x, w=w, b=b: lp(x, w, b, "none", [], ""),
            "GELU in epilogue": lambda x=x, w=w, b=b: lp(x, w, b, "gelu", [], "none")}))
    n = args.square
    a = torch.randn(n, n)
    w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, n))
    cases.append((f"{n} x {n} x {n}", 2 * n ** 3, {"no activation": lambda: lp(a, w, None, "none", [], "")}))
    print(f"{'product (packed weights)':28s}{'no activation':>24s}{'GELU in epilogue':>24s}")
    with torch.inference_mode():
        for label, flops, forms in cases:
            times = {f: [] for f in forms}
            for r in range(args.repeats + 1):
                for f, call in forms.items():
                    t = time.perf_counter()
                    call()
                    if r:
                        times[f].append(time.perf_counter() - t)
            med = {f: statistics.median(v) for f, v in times.items()}
            cells = [f"{med[f] * 1e3:8.1f} ms {flops / med[f] / 1e9:5.0f} GF/s" if f in med else ""
                     for f in ("no activation", "GELU in epilogue")]
            print(f"{label:28s}" + "".join(f"{c:>24s}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
