"""What per-step tracking costs the training step: `spach train` with no sink against TensorBoard + W&B
(offline) + MLflow (a real `mlflow server` on 127.0.0.1, sqlite backend) all on, alternating runs.

    python benchmarks/sink_overhead.py [--pairs 5] [--log-interval 2]
    python benchmarks/sink_overhead.py --per-call        # what one log_step costs the training thread, per sink

Each run trains the tiny model for --epochs epochs on a generated 3-class ImageFolder; the step time is the
train phase's wall time (log.txt's train_epoch_time, which ends behind a device sync) over its steps, for every
epoch after the first (warm-up). Prints the median ms/step of each configuration and their ratio.
"""
import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from PIL import Image


def make_folder(root, n=64, size=32):
    rng = random.Random(0)
    for split, count in (("train", n), ("val", 16)):
        for c in range(3):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                color = tuple(rng.randint(0, 255) if k == c else rng.randint(0, 90) for k in range(3))
                Image.new("RGB", (size, size), color).save(os.path.join(folder, f"{i}.png"))
    return root


def start_mlflow(root):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root}/mlflow.db", "--default-artifact-root", f"file://{root}/artifacts",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(uri + "/health", timeout=2).status == 200:
                return proc, uri
        except OSError:
            time.sleep(0.5)
    raise SystemExit("mlflow server did not start")


def ms_per_step(out, steps):
    rows = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    return [1000 * r["train_epoch_time"] / steps for r in rows[1:]]


def per_call(uri, tmp, calls=300):
    """The training thread's time in one ``log_step`` of each sink (TensorBoard's writer thread, the W&B
    service and the MLflow sender thread do the rest off that thread), median over ``calls`` calls."""
    from types import SimpleNamespace

    from spach.train.metrics import TensorBoardSink
    from spach.train.trackers import MlflowSink, WandbSink
    os.environ["WANDB_MODE"] = "offline"
    out = SimpleNamespace(output_dir=os.path.join(tmp, "per_call"), wandb_tags="", wandb_project="bench",
                          wandb_name="", mlflow_uri=uri, mlflow_log_best=False, mlflow_experiment="bench",
                          mlflow_run_name="")
    cfg = SimpleNamespace(output=out, checkpoint_args=lambda: {"model": "bench", "lr": 1e-3})
    os.makedirs(out.output_dir, exist_ok=True)
    sinks = {"TensorBoard": TensorBoardSink(os.path.join(out.output_dir, "tb")), "W&B (offline)": WandbSink(cfg),
             "MLflow (server)": MlflowSink(cfg)}
    metrics = {"loss": 2.5, "lr": 1e-3, "images_per_s": 900.0, "memory_gib": 3.2, "grad_norm": 1.1}
    for name, sink in sinks.items():
        times = []
        for step in range(calls):
            t = time.perf_counter()
            sink.log_step(step, metrics)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        sink.close()
        print(f"{name:16s} median {1e3 * statistics.median(times):.3f} ms per log_step (p90 "
              f"{1e3 * sorted(times)[int(0.9 * calls)]:.3f} ms); close {time.perf_counter() - t:.2f} s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-call", action="store_true", help="time one log_step per sink instead")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--log-interval", type=int, default=2, help="log every N steps (the default is --print-freq 10)")
    ap.add_argument("--model", default="spach_ms_xxs_patch4_224_attn")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="sink_overhead_")
    data = make_folder(os.path.join(tmp, "data"))
    steps = 3 * 64 // a.batch_size
    server, uri = start_mlflow(tmp)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a kill still stops the server (finally below)
    if a.per_call:
        try:
            per_call(uri, tmp)
        finally:
            os.killpg(server.pid, signal.SIGKILL)
        return
    # one compute thread, passive OpenMP waits: on a shared 2-core machine spinning threads measure the neighbours
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               OMP_WAIT_POLICY="PASSIVE")
    base = ["--data-path", data, "--model", a.model, "--input-size", "32", "--batch-size", str(a.batch_size),
            "--epochs", str(a.epochs), "--warmup-epochs", "0", "--cooldown-epochs", "0", "--aa", "none",
            "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--no-model-ema", "--no-repeated-aug",
            "--num_workers", "0", "--device", "cpu", "--print-freq", "10", "--log-interval", str(a.log_interval),
            "--no-auto-resume"]
    sinks = ["--tensorboard", "--log-wandb", "--mlflow-uri", uri]
    times = {"none": [], "all three": []}
    try:
        for pair in range(a.pairs):
            for name, extra in (("none", []), ("all three", sinks)):
                out = os.path.join(tmp, f"{pair}-{name.replace(' ', '_')}")
                r = subprocess.run([sys.executable, "-m", "spach", "train", *base, "--output_dir", out, *extra],
                                   env=env, capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit(r.stdout[-2000:] + r.stderr[-2000:])
                times[name] += ms_per_step(out, steps)
                print(f"pair {pair} {name:9s} ms/step {[round(t, 1) for t in ms_per_step(out, steps)]}", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:9s} median {v:.1f} ms/step over {len(times[k])} epochs")
    print(f"ratio all three / none: {med['all three'] / med['none']:.3f}")


if __name__ == "__main__":
    main()
