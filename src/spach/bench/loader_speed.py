"""The data loader alone: images per second per loader core, from an ImageFolder or from shards.

One reader in this process (one core: what one DataLoader worker does) reads, decodes and transforms a fixed
number of training images, with the trainer's own datasets and DeiT transform. ``read_latency_ms`` models network
or object storage: every read request that returns data waits that long first. Requests are at most 1 MiB (a
buffered reader in front of the file): a loose JPEG is one request, a shard one request per MiB. The delay lives
here, in the benchmark, never in the trainer's readers.
"""
import io
import statistics
import time
from typing import Dict, List

from ..errors import SpachError

__all__ = ["REQUEST_BYTES", "delayed_open", "build_reader", "measure_reader", "run_loader_benchmark"]

REQUEST_BYTES = 1 << 20


class _DelayedRaw(io.RawIOBase):
    def __init__(self, f, latency_s: float):
        self.f, self.latency_s = f, latency_s

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        if n:
            time.sleep(self.latency_s)
        return n

    def readall(self):  # one request per MiB, as a client reading a whole object would ask
        data = self.f.readall()
        time.sleep(self.latency_s * -(-len(data) // REQUEST_BYTES))
        return data

    def close(self):
        self.f.close()
        super().close()


def delayed_open(path: str, latency_ms: float):
    """``open(path, 'rb')`` whose every read request (at most :data:`REQUEST_BYTES`) first waits ``latency_ms``."""
    raw = open(path, "rb", buffering=0)
    if not latency_ms:
        return io.BufferedReader(raw, buffer_size=REQUEST_BYTES)
    return io.BufferedReader(_DelayedRaw(raw, latency_ms / 1000.0), buffer_size=REQUEST_BYTES)


def build_reader(kind: str, root: str, img_size: int = 224, latency_ms: float = 0.0, seed: int = 0):
    """An iterable of ``(tensor, target, flag)`` over the train split of ``root``: ``IMNET`` (ImageFolder),
    ``WDS`` (shards) or ``HFDS``, each through the trainer's dataset class and DeiT train transform."""
    from ..data import build_transform
    tf = build_transform(True, img_size)
    if kind == "IMNET":
        from ..data.folder import TolerantImageFolder, check_dataset, load_rgb
        classes, samples = check_dataset(root, splits=("train",))

        class Folder(TolerantImageFolder):
            def _read(self, path):
                with delayed_open(path, latency_ms) as f:
                    data = f.read()  # the whole file in one request (a decoder's seeks would cost more)
                return self.transform(load_rgb(io.BytesIO(data)))

        import torch
        order = torch.randperm(len(samples["train"]), generator=torch.Generator().manual_seed(seed)).tolist()
        ds = Folder(samples["train"], classes, tf)
        return (ds[i] for i in order), len(order)
    if kind == "WDS":
        from ..data.shards import ShardDataset, WdsSource
        source = WdsSource(root, splits=("train",))

        class Shards(ShardDataset):
            def _open(self, path):
                return delayed_open(path, latency_ms)

        ds = source.dataset("train", tf, train=True, seed=seed)
        ds.__class__ = Shards
        return iter(ds), len(ds)
    if kind == "HFDS":
        from ..data.shards import HfdsSource
        if latency_ms:
            raise SpachError("--read-latency-ms applies to IMNET and WDS (a Hugging Face table is memory-mapped)")
        source = HfdsSource(root, splits=("train",))
        ds = source.dataset("train", tf)
        import torch
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
        return (ds[i] for i in order), len(order)
    raise SpachError(f"unknown --data-set {kind!r}: use IMNET, WDS or HFDS")


def measure_reader(kind: str, root: str, images: int, img_size: int = 224, latency_ms: float = 0.0,
                   seed: int = 0) -> Dict:
    """Wall-clock and CPU images/s of one reader over ``images`` images (fewer if the split is smaller)."""
    it, n = build_reader(kind, root, img_size, latency_ms, seed)
    n = min(n, images)
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    for _ in it:
        done += 1
        if done == n:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"kind": kind, "images": done, "wall_s": wall, "cpu_s": cpu, "img_per_s": done / wall,
            "img_per_cpu_s": done / cpu if cpu > 0 else None, "read_latency_ms": latency_ms}


def run_loader_benchmark(pairs: List[tuple], images: int, rounds: int, img_size: int = 224,
                         latency_ms: float = 0.0) -> List[Dict]:
    """Alternate the readers of ``pairs`` ((kind, root), ...) round by round (A B, B A, ...), so load from other
    processes hits them alike; the median of the rounds per reader."""
    import torch
    torch.set_num_threads(1)  # one loader core
    per: Dict[str, List[Dict]] = {}
    for r in range(rounds):
        order = pairs if r % 2 == 0 else list(reversed(pairs))
        for kind, root in order:
            per.setdefault(kind, []).append(measure_reader(kind, root, images, img_size, latency_ms, seed=r))
    out = []
    for kind, runs in per.items():
        rates = [x["img_per_s"] for x in runs]
        out.append({"kind": kind, "images": runs[0]["images"], "rounds": rounds, "read_latency_ms": latency_ms,
                    "img_per_s_median": statistics.median(rates), "img_per_s_rounds": rates,
                    "img_per_cpu_s_median": statistics.median(x["img_per_cpu_s"] or 0.0 for x in runs),
                    "img_per_cpu_s_rounds": [x["img_per_cpu_s"] for x in runs]})
    return out

