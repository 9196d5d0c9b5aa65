"""Helpers for the training-system tests: a tiny real-image ImageFolder, the common fast flags and a local
HTTP server for weights given as URLs."""
import contextlib
import functools
import http.server
import io
import os
import random
import subprocess
import sys
import threading

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
