"""The two costs of long-run training: gradient accumulation at an equal global batch, and the time from a stop
signal to the process's exit.

    python benchmarks/long_runs.py accumulation [--model spach_ms_s_patch4_224_conv] [--global 16] [--rounds 3]
    python benchmarks/long_runs.py signal [--model spach_ms_s_patch4_224_conv] [--tries 3]

``accumulation`` runs ``spach benchmark --mode train`` at the same global batch as 1 x G, 2 x G/2 and 4 x G/4
(batch x accumulated micro-batches), and each micro-batch size alone (G/2 x 1, G/4 x 1), the configurations
alternating round by round; prints each one's median images/s, its ratio to the plain path (G x 1) per round, and
each accumulation's ratio to its micro-batch alone (what accumulating itself costs).

``signal`` starts ``spach train`` on the embedded demo data at input 224 with a Conv-MS-S model and an output
folder, waits until a step has been logged, sends SIGTERM and measures the time until the process has exited
(the rest of the step, the recovery checkpoint written and fsync'ed, the shut-down); prints each try, the step
time and the size of recovery.pth.
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def _cpu_flags() -> str:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    flags = set(re.findall(r"\b(avx2|avx512f|avx512_bf16|amx_bf16)\b", text))
    return " ".join(sorted(flags)) or "none of avx2/avx512"


def accumulation(args):
    layouts = [(args.global_batch // a, a) for a in (1, 2, 4) if args.global_batch % a == 0]
    # each micro-batch size alone too: what the smaller batch costs by itself, apart from accumulating
    alone = [(b, 1) for b, a in layouts if a > 1]
    rates = {layout: [] for layout in layouts + alone}
    for r in range(args.rounds):
        for batch, accum in layouts + alone:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, "-m", "spach", "benchmark", "--model", args.model, "--mode", "train",
                       "--device", "cpu", "--batch-size", str(batch), "--grad-accum-steps", str(accum),
                       "--steps", str(args.steps), "--warmup", "1", "--repeats", "1", "--img-size", str(args.img_size),
                       "--json", f.name]
                subprocess.run(cmd, check=True, capture_output=True)
                result = json.load(open(f.name))
                result = result[0] if isinstance(result, list) else result
                rate = result["img_per_s"] if "img_per_s" in result else result["results"][0]["img_per_s"]
            rates[(batch, accum)].append(rate)
            print(f"round {r}: {batch} x {accum}: {rate:.2f} img/s", flush=True)
    plain = rates[layouts[0]]
    print(f"\n{args.model}, input {args.img_size}, global batch {args.global_batch}; CPU flags: {_cpu_flags()}")
    for layout in layouts + alone:
        ratios = [x / p for x, p in zip(rates[layout], plain)]
        print(f"  {layout[0]:>3} x {layout[1]}: median {statistics.median(rates[layout]):.2f} img/s, "
              f"ratio to {layouts[0][0]} x 1: median {statistics.median(ratios):.3f} "
              f"(rounds {', '.join(f'{x:.3f}' for x in ratios)})")
    for batch, accum in layouts[1:]:
        ratios = [x / p for x, p in zip(rates[(batch, accum)], rates[(batch, 1)])]
        print(f"  {batch} x {accum} against {batch} x 1 (the accumulation alone): median "
              f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{x:.3f}' for x in ratios)})")


def stop_signal(args):
    times = []
    for t in range(args.tries):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "spach", "train", "--model", args.model, "--input-size", "224",
                   "--batch-size", str(args.batch), "--epochs", "1", "--print-freq", "1", "--num_workers", "1",
                   "--device", "cpu", "--output_dir", out]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            steps = []
            for line in proc.stdout:
                m = re.search(r"Epoch: \[0\]\s+\[\s*(\d+)/\d+\].* time: ([0-9.]+)s", line)
                if m:
                    steps.append(float(m.group(2)))
                    if len(steps) == 3:  # two step times seen: the signal lands inside the fourth step
                        time.sleep((steps[2] - steps[1]) / 2)
                        sent = time.perf_counter()
                        proc.send_signal(signal.SIGTERM)
                        break
            rest = proc.communicate()[0]
            elapsed = time.perf_counter() - sent
            size = os.path.getsize(os.path.join(out, "recovery.pth")) / 2 ** 20
            step_s = steps[2] - steps[1]
            times.append(elapsed)
            print(f"try {t}: exit status {proc.returncode}, {elapsed:.2f} s from SIGTERM to exit; step "
                  f"{step_s:.2f} s; recovery.pth {size:.0f} MiB", flush=True)
            if proc.returncode != 75:
                print(rest[-2000:])
    print(f"\n{args.model}, batch {args.batch}, input 224; CPU flags: {_cpu_flags()}; median signal-to-exit "
          f"{statistics.median(times):.2f} s over {len(times)} tries")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("accumulation")
    a.add_argument("--model", default="spach_ms_s_patch4_224_conv")
    a.add_argument("--global", dest="global_batch", type=int, default=16)
    a.add_argument("--img-size", dest="img_size", type=int, default=224)
    a.add_argument("--steps", type=int, default=3)
    a.add_argument("--rounds", type=int, default=3)
    s = sub.add_parser("signal")
    s.add_argument("--model", default="spach_ms_s_patch4_224_conv")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--tries", type=int, default=3)
    args = p.parse_args()
    accumulation(args) if args.what == "accumulation" else stop_signal(args)


if __name__ == "__main__":
    main()
