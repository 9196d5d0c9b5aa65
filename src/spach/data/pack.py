"""Write an ImageFolder as WebDataset tar shards (``spach pack``).

Each image's file bytes go into the tar unchanged (no re-encoding) as ``<key>.<its extension>``, with its class
index as ``<key>.cls``; the class indices are the ImageFolder's (sorted class folder names), checked by the same
:func:`~spach.data.folder.check_dataset` as training. The train split is written in a seeded random order (a
sequential reader then sees mixed classes); val in folder order. ``_info.json`` (timm's shard index format plus the
class names and per-class counts) is written last.

Restartable: each shard is written to a temporary file and renamed when complete, so an interrupted pack leaves
only whole shards; the same command again keeps them and writes the rest. A plan file records the source, the
shard size and the seed, and a rerun with different ones is refused instead of mixing two layouts.
"""
import hashlib
import json
import os
import random
from typing import Dict, List, Sequence, Tuple

from ..errors import DataError
from ..files import open_own, open_regular, os_error_reason
from .folder import check_dataset
from .shards import INFO_NAME, require_shards_extra

__all__ = ["pack_imagefolder", "PLAN_NAME", "shard_name"]

PLAN_NAME = ".pack-plan.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _plan(src: str, classes: List[str], samples: Dict[str, list], shard_size: int, seed: int) -> dict:
    digest = hashlib.sha256()
    for split in sorted(samples):
        for path, target in samples[split]:
            digest.update(f"{split}\0{os.path.relpath(path, src)}\0{os.path.getsize(path)}\0{target}\n".encode())
    return {"source": os.path.abspath(src), "shard_size": shard_size, "seed": seed, "classes": classes,
            "files_sha256": digest.hexdigest()}


def _atomic_json(obj, path: str):
    tmp = path + ".tmp"
    with os.fdopen(open_own(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, what="pack index"), "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(path: str, items: Sequence[Tuple[int, str, int]], progress):
    from webdataset import TarWriter
    tmp = path + ".tmp"
    with os.fdopen(open_own(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, what="shard"), "wb") as f:
        # an integer mtime keeps each member to one 512-byte header (a float one adds a PAX header that readers
        # parse in Python for every member) and makes a rerun write the same bytes
        with TarWriter(f, encoder=False, mtime=0) as sink:
            for key, file, target in items:
                try:
                    with open_regular(file) as img:
                        data = img.read()
                except OSError as e:  # deleted, replaced or made unreadable since the scan
                    raise DataError(f"source image {file} {os_error_reason(e) if e.errno else str(e)} (it changed "
                                    f"while packing): restore it or rescan, then rerun the same command to finish "
                                    f"the pack") from None
                ext = os.path.splitext(file)[1].lower().lstrip(".")
                sink.write({"__key__": f"{key:08d}", ext: data, "cls": str(target).encode()})
                if progress is not None:
                    progress.update(1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a shard exists under its name only when it is complete


def pack_imagefolder(src: str, out: str, shard_size: int = 1000, seed: int = 0, splits=("train", "val"),
                     show_progress: bool = True, claim=None) -> dict:
    """Pack ``src/{train,val}/<class>/*`` into ``out``; returns the index written to ``out/_info.json``.
    ``claim(out)`` runs once ``out`` exists, before anything in it is read or written (the caller's lock)."""
    require_shards_extra("webdataset")
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1 image (got {shard_size})")
    classes, samples = check_dataset(src, splits=tuple(splits))
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"{out} is a file: pass a folder for the shards (it is created if missing)")
    os.makedirs(out, exist_ok=True)
    if claim is not None:
        claim(out)
    plan = _plan(src, classes, samples, shard_size, seed)
    plan_path = os.path.join(out, PLAN_NAME)
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        if old != plan:
            changed = [k for k in plan if old.get(k) != plan[k]]
            raise DataError(f"{out} holds shards of another pack (different {', '.join(changed)}): remove the folder "
                            f"or pick an empty one")
    elif any(n.endswith(".tar") or n == INFO_NAME for n in os.listdir(out)):
        raise DataError(f"{out} already holds shards not written by this pack: pick an empty folder")
    else:
        _atomic_json(plan, plan_path)
    for name in os.listdir(out):  # what a killed write left: never a shard
        if name.endswith(".tar.tmp"):
            os.remove(os.path.join(out, name))

    info = {"name": os.path.basename(os.path.normpath(src)), "format": "webdataset, written by spach pack",
            "classes": classes, "num_classes": len(classes), "splits": {}}
    todo = []
    for split in splits:
        items = [(i, path, target) for i, (path, target) in enumerate(samples[split])]
        if split == "train":
            random.Random(seed).shuffle(items)  # mixed classes within each shard
        chunks = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
        names = [shard_name(split, i) for i in range(len(chunks))]
        counts = [0] * len(classes)
        for _, _, target in items:
            counts[target] += 1
        info["splits"][split] = {"name": split, "num_samples": len(items), "filenames": names,
                                 "shard_lengths": [len(c) for c in chunks], "class_counts": counts}
        todo += [(os.path.join(out, n), c) for n, c in zip(names, chunks)]
    done = [t for t in todo if os.path.isfile(t[0])]
    total = sum(len(c) for _, c in todo)
    bar = None
    if show_progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=sum(len(c) for _, c in done), unit="img", desc=f"packing into {out}",
                   dynamic_ncols=True)
    try:
        for path, chunk in todo:
            if not os.path.isfile(path):
                _write_shard(path, chunk, bar)
    finally:
        if bar is not None:
            bar.close()
    _atomic_json(info, os.path.join(out, INFO_NAME))
    return info
