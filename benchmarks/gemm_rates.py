"""Matrix-product rates (GFLOP/s) at the shapes of the XXS models' training step, fp32 against bf16, on the CPU.

This is the ceiling of the training-step speed-ups in RESULTS.md: the products are most of the step's work, and
bf16 can make the step at most about as much faster as it makes these. Run with the allocator setting that
``spach train`` applies on a CPU (so the outputs land in reused memory, not in freshly page-faulted pages),
median of ``--repeats`` timed calls after one warm-up call.

    python benchmarks/gemm_rates.py [--threads N] [--repeats 10] [--batch 64]
"""
import argparse
import statistics
import sys
import time

import torch


def shapes(batch):
    """(label, A shape, B shape) at the Trans-/MLP-/Conv-MS-XXS shapes for a batch of ``batch``."""
    return [
        ("attention q k^T, 28x28 grid, head dim 64", (batch, 784, 64), (batch, 64, 784)),
        ("attention p v, 28x28 grid", (batch, 784, 784), (batch, 784, 64)),
        ("attention q k^T, 14x14 grid, head dim 128", (batch, 196, 128), (batch, 128, 196)),
        ("channel MLP fc1, 28x28 grid, 64 -> 128", (batch * 784, 64), (64, 128)),
        ("qkv, 28x28 grid, 64 -> 192", (batch * 784, 64), (64, 192)),
        ("channel MLP fc1, 14x14 grid, 128 -> 256", (batch * 196, 128), (128, 256)),
        ("token MLP fc1, 28x28 grid, 784 -> 392", (batch * 64, 784), (784, 392)),
        ("weight gradient, 14x14 grid, 256 x 128", (256, batch * 196), (batch * 196, 128)),
    ]


def rate(a, b, repeats):
    op = torch.bmm if a.dim() == 3 else torch.mm
    op(a, b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        op(a, b)
        times.append(time.perf_counter() - t)
    flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
    return flops / statistics.median(times) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    from spach.runtime.cpu_tuning import apply_cpu_tuning, cpu_model_name
    apply_cpu_tuning(args.threads)
    print(f"# {cpu_model_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch}")
    print(f"{'product':45s} {'fp32 GF/s':>9s} {'bf16 GF/s':>9s} {'bf16/fp32':>9s}")
    ratios = []
    for label, sa, sb in shapes(args.batch):
        g = torch.Generator().manual_seed(0)
        a32, b32 = torch.randn(sa, generator=g), torch.randn(sb, generator=g)
        r32 = rate(a32, b32, args.repeats)
        r16 = rate(a32.bfloat16(), b32.bfloat16(), args.repeats)
        ratios.append(r16 / r32)
        print(f"{label:45s} {r32:9.4g} {r16:9.4g} {r16 / r32:8.3g}x")  # small products on a busy host are < 1 GF/s
    print(f"median bf16/fp32: {statistics.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
