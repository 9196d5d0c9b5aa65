"""Helpers for the training-system tests: a tiny real-image ImageFolder, the common fast flags, torchrun (one
agent, or several agents on this host standing for several machines) and a local HTTP server for weights given as
URLs."""
import contextlib
import dataclasses
import functools
import http.server
import io
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional

from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = "spach_ms_xxs_patch4_224_attn"
CLASSES = ("circle", "cross", "square")


def draw_shape(kind: str, rng: random.Random, size: int = 32) -> Image.Image:
    """A filled shape of random size and position on a random dark background."""
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    # each class has its own dominant hue as well as its shape, so a few steps learn it
    hue = {"circle": 0, "cross": 1, "square": 2}.get(kind, rng.randint(0, 2))
    fg = tuple(rng.randint(190, 255) if c == hue else rng.randint(0, 120) for c in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r + 1, size - r - 2), rng.randint(r + 1, size - r - 2)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        w = max(2, r // 2)
        d.rectangle([cx - r, cy - w // 2, cx + r, cy + w // 2], fill=fg)
        d.rectangle([cx - w // 2, cy - r, cx + w // 2, cy + r], fill=fg)
    return img


def make_shapes_folder(root, n_train: int = 32, n_val: int = 12, size: int = 32, seed: int = 0, classes=CLASSES,
                       ext: str = ".png"):
    """Write ``root/{train,val}/<shape>/*.png``; returns ``str(root)``."""
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for kind in classes:
            folder = os.path.join(root, split, kind)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                draw_shape(kind, rng, size).save(os.path.join(folder, f"{kind}_{i:03d}{ext}"))
    return str(root)


def fast_flags(data, out, *extra, epochs=2, batch=16, lr=2e-3, workers=0, device="cpu"):
    """Flags for a seconds-long CPU run; ``lr`` is the wanted lr (the CLI scales it by batch / 512)."""
    return ["--data-path", str(data), "--output_dir", str(out), "--model", TINY_MODEL, "--input-size", "32",
            "--batch-size", str(batch), "--epochs", str(epochs), "--lr", repr(lr * 512 / batch),
            "--warmup-epochs", "0", "--cooldown-epochs", "0", "--aa", "none", "--reprob", "0", "--mixup", "0",
            "--cutmix", "0", "--no-model-ema", "--no-repeated-aug", "--hflip", "0", "--crop-pct", "1",
            "--drop-path", "0", "--num_workers", str(workers), *(["--device", device] if device else []), "--seed", "0",
            "--print-freq", "5", *extra]


def run_spach(*argv, env=None, timeout=300, cwd=None):
    """Run ``python -m spach ...`` in a subprocess; returns the CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "spach", *map(str, argv)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*argv, nproc=2, env=None, timeout=300):
    """``torchrun --nproc_per_node nproc -m spach ...`` on a free port; returns the CompletedProcess (text)."""
    # torchrun leaves a torchelastic_* log folder in the temporary directory: give it one that goes afterwards
    with tempfile.TemporaryDirectory(prefix="spach-torchrun-") as tmp:
        full_env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=tmp, **(env or {}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "-m", "spach", *map(str, argv)]
        return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@dataclasses.dataclass
class Node:
    """One agent of a multi-node group started on this host: its process and where its output goes."""
    node_rank: int
    proc: subprocess.Popen
    stdout_path: str
    stderr_path: str
    returncode: Optional[int] = None
    stdout: str = ""
    stderr: str = ""


@dataclasses.dataclass
class Nodes:
    """The agents of one group (``nodes[i]`` is node rank i) and the folder their temporary files go to."""
    nodes: List[Node]
    tmp: tempfile.TemporaryDirectory
    port: int

    def __iter__(self):
        return iter(self.nodes)

    def __getitem__(self, i):
        return self.nodes[i]


def torchrun_node_cmd(node_rank, nnodes, nproc, port, rendezvous="static", torchrun_flags=()):
    """The torchrun flags of node ``node_rank`` of ``nnodes`` machines whose node 0 is this host."""
    cmd = ["--nnodes", str(nnodes), "--nproc_per_node", str(nproc), "--node_rank", str(node_rank)]
    if rendezvous == "static":  # ranks follow --node_rank: node r runs ranks r*nproc .. r*nproc+nproc-1
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    elif rendezvous == "c10d":  # ranks follow the order of (host, agent pid): node_rank is not used
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"spach-{port}"]
    else:
        raise ValueError(rendezvous)
    return cmd + list(map(str, torchrun_flags))


def start_nodes(*argv, nnodes=2, nproc=1, rendezvous="static", torchrun_flags=(), env=None, node_env=None,
                launcher=None) -> Nodes:
    """Start ``nnodes`` torchrun agents on this host, as the machines of one multi-node job (``--nnodes``, each
    with its ``--node_rank``), each running ``python -m spach *argv``; returns at once.

    ``torchrun_flags`` go to every agent (``--max-restarts 1`` ...), ``env`` to every agent and ``node_env[i]`` to
    node i only (``SPACH_FAULT_RANK`` ...). ``launcher(node_rank, port)``, when given, returns the whole command of
    node ``node_rank`` instead (a launcher script). Each agent writes its output to a file (a pipe left unread
    would stall one agent and with it the group) and gets its own process group, so that :func:`wait_nodes` can
    stop the whole tree. The agents' temporary files (torchelastic_* log folders) go to one temporary folder that
    :func:`wait_nodes` removes."""
    tmp = tempfile.TemporaryDirectory(prefix="spach-nodes-")
    port = free_port()
    nodes = []
    try:
        for r in range(nnodes):
            full_env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=tmp.name, **(env or {}))
            full_env.update((node_env or {}).get(r, {}))
            if launcher is not None:
                cmd = [str(c) for c in launcher(r, port)]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run",
                       *torchrun_node_cmd(r, nnodes, nproc, port, rendezvous, torchrun_flags),
                       "-m", "spach", *map(str, argv)]
            out, err = (os.path.join(tmp.name, f"node{r}.{k}") for k in ("out", "err"))
            with open(out, "w") as fo, open(err, "w") as fe:
                proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            nodes.append(Node(r, proc, out, err))
    except BaseException:
        _stop(nodes)
        tmp.cleanup()
        raise
    return Nodes(nodes, tmp, port)


def _stop(nodes):
    for n in nodes:
        if n.proc.poll() is None:
            try:
                os.killpg(n.proc.pid, signal.SIGKILL)  # the agent's own session: it and its workers
            except ProcessLookupError:
                pass
        n.proc.wait()


def wait_nodes(group: Nodes, timeout=300) -> List[Node]:
    """Wait for every agent of ``group``; fills in each node's ``returncode``, ``stdout`` and ``stderr`` and
    removes the temporary folder. The agents still running are killed once ``timeout`` seconds have passed, or
    ``timeout`` / 4 after the first agent ended (the group ends together: the others wait for a node that is
    gone); those keep the returncode -9. Raises TimeoutError, with the output so far, at the deadline."""
    deadline = time.monotonic() + timeout
    first_end = None
    timed_out = False
    try:
        while any(n.proc.poll() is None for n in group):
            now = time.monotonic()
            if first_end is None and any(n.proc.poll() is not None for n in group):
                first_end = now
            if now > deadline or (first_end is not None and now - first_end > timeout / 4):
                timed_out = now > deadline
                break
            time.sleep(0.2)
    finally:
        _stop(group.nodes)
        for n in group:
            n.returncode = n.proc.returncode
            with open(n.stdout_path, errors="replace") as f:
                n.stdout = f.read()
            with open(n.stderr_path, errors="replace") as f:
                n.stderr = f.read()
        group.tmp.cleanup()
    if timed_out:
        raise TimeoutError(f"{len(group.nodes)} agents still running after {timeout} s:\n" + "\n".join(
            f"--- node {n.node_rank}: stdout\n{n.stdout[-1500:]}\n--- stderr\n{n.stderr[-2500:]}" for n in group))
    return group.nodes


def torchrun_nodes(*argv, timeout=300, **kw) -> List[Node]:
    """:func:`start_nodes` then :func:`wait_nodes`: the agents' results, node 0 first."""
    return wait_nodes(start_nodes(*argv, **kw), timeout=timeout)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def photo(w, h, seed=0, noise=6.0):
    """A smooth, photo-like RGB image with sensor-like noise and a flat red block (JPEG and resize tests)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(xx / (20 + 7 * c) + yy / (31 - 5 * c)) for c in range(3)], -1)
    img += rng.normal(0, noise, img.shape)
    img[h // 4: h // 2, w // 3: w // 2] = (230, 40, 60)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_folder(folder):
    """Serve ``folder`` over HTTP on a free local port for the duration of the block; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def randomise_head(model, seed=0):
    """timm-style init zeroes the classifier: give it weights so that the logits differ between inputs."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g) * 0.5)
        model.head.bias.copy_(torch.randn(model.head.bias.shape, generator=g) * 0.5)
    return model.eval()
