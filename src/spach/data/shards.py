"""WebDataset tar shards (``--data-set WDS``) and Hugging Face datasets on disk (``--data-set HFDS``).

Both are read through the libraries made for them (``webdataset``'s tar iterators, ``datasets``' Arrow tables;
``pip install 'spach[shards]'``) and give the items an ImageFolder gives: ``(image, class index, replaced)``.

**WDS layout** (what ``spach pack`` writes, and what timm's ``wds/`` reader reads): ``DIR/_info.json`` lists each
split's shard files and their sample counts (timm's ``splits.<name>.filenames`` / ``shard_lengths``), plus the
class names; a sample is ``<key>.<jpg|png|...>`` (the original image bytes) and ``<key>.cls`` (the class index as
text). The val split is called ``val`` or ``validation``.

**Epochs from shards.** An epoch is defined by the index, not by what the readers happen to find: with ``W`` ranks
and batch ``B`` each rank yields ``(N // W) // B`` full batches (the ImageFolder sampler's count), so the schedule,
the FPS and the steps per epoch do not depend on how the shards are spread. Each epoch the shard list is permuted
by ``seed + epoch`` (the same on every rank) and dealt out: rank ``r`` reads shards ``r, r+W, ...`` of it and
splits them over its loader workers in the same way; inside a worker a shuffle buffer (seeded by seed, epoch, rank
and worker) mixes samples of its shards. A worker whose shards hold fewer samples than its share of the epoch reads
them again, reshuffled; one whose shards hold more stops early (those images come first in another epoch). With
fewer shards than ranks (or workers) the remaining split is by sample (everyone reads those shards and keeps every
k-th sample). Validation reads every shard once, nothing padded or repeated, so ``--dist-eval`` counts each image
exactly once. The order is a function of (seed, epoch, rank, worker) only, so a resumed run reads the same data.

**Augmentation and mid-epoch resume.** Each training sample's transform runs with torch's CPU generator, Python's
``random`` and NumPy's global generator seeded by :func:`spach.data.seeding.sample_seed` from (seed, epoch, its
position), and the caller's states put back afterwards (with ``num_workers=0`` the caller is the training process).
The position is the sample's place in the epoch as a sampler's global sequence numbers it: sample ``i`` of rank
``r``'s batches is position ``i*W + r``, where a DataLoader takes batch ``k`` from worker ``k % workers``, so worker
``w``'s ``m``-th sample is ``i = (w + workers*(m // B))*B + m % B``. ``set_epoch(epoch, start)`` resumes after the
``start`` samples all ranks consumed (a multiple of ``W x B``, on the same ``W`` and number of loader workers): with
``k = start // W // B`` batches done on each rank, a resumed loader's worker ``w`` plays the uninterrupted epoch's
worker ``(w + k) % workers`` (the one that would have made batch ``k + w``), passes over the samples that worker
already yielded in its raw stream, through the same shuffle buffer and without decoding them, and yields the rest
of its batches: the same samples, in the same order, augmented the same. ``len()`` is then the rest of this rank's
epoch, so the loader's ``len()`` is the number of steps left.

**Bad data.** A shard that is missing, truncated or not a tar, a sample without an image or a label, a label
outside the class list, an image that does not decode: skipped, logged once per shard, and counted in the
``replaced`` flag of the next sample (the epoch's skipped count); with ``strict`` one :class:`DataError` names the
shard and the member. In training an image that does not decode (found only by decoding it) keeps its place instead:
the next sample of the worker's stream that decodes stands in for it, flagged, and it counts once, at its own
place in the first pass (a repeated augmentation's copy or a re-read meets it again without counting), so which
sample is where never depends on what was decoded, and a resumed epoch need not decode what it passes over.
A worker whose shards give no readable sample at all stops with an error instead of waiting (so does one that
meets a whole pass, or 4 shuffle buffers in a row, of images that do not decode).

**HFDS** is a map-style dataset (``datasets.load_from_disk`` for a ``save_to_disk`` folder, else
``datasets.load_dataset`` on a Hub-format local copy): the ImageFolder samplers, repeated augmentation and
resume apply to it unchanged.
"""
import collections
import io
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError, SpachError
from ..files import open_regular
from . import seeding
from .folder import BAD_IMAGE_ERRORS, class_difference, load_rgb

__all__ = ["INFO_NAME", "VAL_NAMES", "IMAGE_SUFFIXES", "ShardSplit", "WdsSource", "HfdsSource", "ShardDataset",
           "HfImageDataset", "open_source", "require_shards_extra", "split_slots"]

logger = logging.getLogger("spach.data")

INFO_NAME = "_info.json"
VAL_NAMES = ("val", "validation")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "pgm", "tif", "tiff")
SHUFFLE_BUFFER = 1024  # samples (raw bytes) per loader worker: ~110 MB of ImageNet JPEGs
_INSTALL = "pip install 'spach[shards]'"


def require_shards_extra(module: str):
    """Import ``webdataset`` or ``datasets``, or say how to install them."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpachError(f"reading shards needs the {module} package, which is not installed: {_INSTALL}") from None


def _split_key(splits: Dict[str, object], want: str) -> Optional[str]:
    names = VAL_NAMES if want == "val" else (want,)
    return next((n for n in names if n in splits), None)


def split_slots(n_shards: int, rank: int, world: int, worker: int, workers: int):
    """Which positions of an epoch's shard list one (rank, worker) reads, and which samples of them it keeps:
    ``(shard positions, (mod, rem))`` -- it keeps the samples whose running index ``i`` has ``i % mod == rem``.
    Shards are dealt out whole while there are enough of them; below that, by sample."""
    if n_shards >= world:
        mine, mod, rem = list(range(rank, n_shards, world)), 1, 0
    else:
        mine, mod, rem = list(range(n_shards)), world, rank
    if mod == 1 and len(mine) >= workers:
        return mine[worker::workers], (1, 0)
    return mine, (mod * workers, rem + mod * worker)


def _kept(n: int, mod: int, rem: int) -> int:
    """How many of ``n`` running indices ``i`` have ``i % mod == rem``."""
    return max(0, (n - rem + mod - 1) // mod) if n > rem else 0


@dataclass
class ShardSplit:
    """One split of a shard index: absolute shard paths, their sample counts, per-class counts (if known)."""
    name: str
    shards: List[str]
    counts: List[int]
    class_counts: Optional[List[int]] = None

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def _read_index(root: str) -> dict:
    path = os.path.join(root, INFO_NAME)
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: --data-set WDS reads DIR/{INFO_NAME}, the shard index (write shards "
                        f"with `spach pack IMAGEFOLDER DIR`, or point --data-path at the folder that holds it)")
    try:
        with open_regular(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the shard index {path} ({e}): rewrite it with `spach pack`") from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise DataError(f"{path} has no 'splits' table: it is not a shard index (write one with `spach pack`)")
    return info


def _classes_of(info: dict, path: str) -> List[str]:
    classes = info.get("classes")
    if isinstance(classes, list) and classes:
        return [str(c) for c in classes]
    if isinstance(info.get("num_classes"), int) and info["num_classes"] > 0:
        return [str(i) for i in range(info["num_classes"])]
    raise DataError(f"{path} names no classes ('classes' or 'num_classes'): add the class names in label order "
                    f"as \"classes\": [...] so labels can be checked")


class WdsSource:
    """A checked WebDataset shard folder: its class names and the requested splits."""

    streaming = True
    kind = "WDS"

    def __init__(self, root: str, splits: Sequence[str] = ("train", "val")):
        require_shards_extra("webdataset")
        _check_root(root, "WDS")
        info = _read_index(root)
        index = os.path.join(root, INFO_NAME)
        self.root = root
        self.classes = _classes_of(info, index)
        split_classes = info.get("split_classes") or {}
        self.splits: Dict[str, ShardSplit] = {}
        for want in splits:
            key = _split_key(info["splits"], want)
            if key is None:
                raise DataError(f"{index} has no '{want}' split (it has {', '.join(sorted(info['splits'])) or 'none'}):"
                                f" pack both splits with `spach pack` (DIR/train/ and DIR/val/ of an ImageFolder)")
            own = split_classes.get(key)
            if own is not None and [str(c) for c in own] != self.classes:
                _refuse_class_mismatch(self.classes, [str(c) for c in own], f"{index} split '{key}'", "the index")
            entry = info["splits"][key]
            files, lengths = entry.get("filenames"), entry.get("shard_lengths")
            _check_split_entry(entry, key, index, len(self.classes))
            files, lengths = entry["filenames"], entry["shard_lengths"]
            shards = [f if os.path.isabs(f) else os.path.join(root, f) for f in files]
            self.splits[want] = ShardSplit(key, shards, [int(n) for n in lengths], entry.get("class_counts"))

    def count(self, split: str) -> int:
        return self.splits[split].num_samples

    def dataset(self, split: str, transform: Optional[Callable], *, train: bool, strict: bool = False,
                num_replicas: int = 1, rank: int = 0, seed: int = 0, batch_size: int = 1, repeats: int = 1):
        return ShardDataset(self.splits[split], len(self.classes), transform, train=train, strict=strict,
                            num_replicas=num_replicas, rank=rank, seed=seed, batch_size=batch_size, repeats=repeats)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 40


def _check_split_entry(entry, key: str, index: str, n_classes: int):
    """The fields of one split of a shard index, an untrusted file: each wrong type is one line naming it."""
    def bad(what):
        return DataError(f"{index}: split '{key}' {what}: rewrite the index with `spach pack`")
    if not isinstance(entry, dict):
        raise bad(f"is a {type(entry).__name__}, not a table")
    files, lengths = entry.get("filenames"), entry.get("shard_lengths")
    if not isinstance(files, list) or not files or not isinstance(lengths, list) or len(lengths) != len(files):
        raise bad("needs 'filenames' and 'shard_lengths' of the same length (one count per shard)")
    if not all(isinstance(f, str) and f and "\0" not in f for f in files):
        raise bad("has a 'filenames' entry that is not a file name")
    if not all(_count(n) for n in lengths):
        raise bad("has a 'shard_lengths' entry that is not a count of images")
    counts = entry.get("class_counts")
    if counts is not None and not (isinstance(counts, list) and len(counts) == n_classes and all(map(_count, counts))):
        raise bad(f"has 'class_counts' that are not {n_classes} counts (one per class)")


def _check_root(root: str, kind: str):
    if not root or not os.path.exists(root):
        raise DataError(f"dataset folder {root!r} does not exist: pass --data-path DIR with the {kind} dataset")
    if not os.path.isdir(root):
        raise DataError(f"--data-path {root} is a file, not a folder: pass the folder of the {kind} dataset")


def _refuse_class_mismatch(classes: List[str], other: List[str], where: str, ref: str):
    raise DataError(f"the classes of {where} differ from those of {ref} ({class_difference(classes, other, ref, where)}): "
                    f"both splits need the same class list in the same order")


def _undecodable(e: Exception) -> str:
    return f"not a decodable image ({type(e).__name__}: {e})" if str(e) else "not a decodable image"


class _Skipped(Exception):
    """A sample (or the rest of a shard) that cannot be used; ``count`` samples are lost."""

    def __init__(self, shard: str, member: str, reason: str, count: int = 1):
        super().__init__(reason)
        self.shard, self.member, self.reason, self.count = shard, member, reason, count


class ShardDataset(IterableDataset):
    """One split of WebDataset shards as ``(image, target, replaced)`` items (see the module docstring for the
    epoch, sharding, seeding, resume and bad-data rules). ``set_epoch`` before each epoch, as for a sampler."""

    def __init__(self, split: ShardSplit, num_classes: int, transform: Optional[Callable] = None, *, train: bool,
                 strict: bool = False, num_replicas: int = 1, rank: int = 0, seed: int = 0, batch_size: int = 1,
                 repeats: int = 1, shuffle_buffer: int = SHUFFLE_BUFFER):
        n = split.num_samples
        if train and n // num_replicas < batch_size:
            raise DataError(f"shards of split '{split.name}' hold {n} images, fewer than one batch of {batch_size} per "
                            f"process x {num_replicas} process(es): lower --batch-size to at most "
                            f"{max(1, n // num_replicas)}")
        self.split = split
        self.num_classes = num_classes
        self.transform = transform
        self.train = train
        self.strict = strict
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.batch_size = batch_size
        self.repeats = max(1, repeats)
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.start = 0  # global samples of the epoch consumed before this reader (a mid-epoch resume)
        self._reported = set()  # (shard, reason) already logged by this process
        self._counted = set()
        self.steps = (n // num_replicas) // batch_size if train else 0

    def set_epoch(self, epoch: int, start: int = 0):
        """Read ``epoch`` from global position ``start``: the samples all ranks together consumed before a
        mid-epoch resume (a multiple of ``num_replicas x batch_size``, consumed on as many ranks and with as many
        loader workers as now). The rest of the epoch is what an uninterrupted one yields after them."""
        unit = self.num_replicas * self.batch_size
        if (start and not self.train) or start % unit or not 0 <= start <= self.steps * unit:
            raise ValueError(f"position {start} does not start a step of {self.num_replicas} process(es) x "
                             f"{self.batch_size} samples in an epoch of {self.steps * unit} samples")
        self.epoch, self.start = epoch, start

    @property
    def done_batches(self) -> int:
        """This rank's batches of the epoch before ``start``."""
        return self.start // self.num_replicas // self.batch_size

    def __len__(self):
        if self.train:  # what is left of this rank's epoch: a DataLoader's len() is this // batch_size
            return (self.steps - self.done_batches) * self.batch_size
        shards, (mod, rem) = split_slots(len(self.split.shards), self.rank, self.num_replicas, 0, 1)
        return _kept(sum(self.split.counts[i] for i in shards), mod, rem)

    # ---- the order of one epoch
    def _shard_order(self) -> List[int]:
        order = list(range(len(self.split.shards)))
        if self.train:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def _worker(self):
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def __iter__(self) -> Iterator[Tuple[object, int, int]]:
        self._counted = set()  # (shard, member) skipped in this epoch by this reader: each counts once
        worker, workers = self._worker()
        done = self.done_batches if self.train else 0
        # A DataLoader takes batch k from worker k % workers. A resumed loader starts again at its worker 0, which
        # must produce what the uninterrupted epoch's batch `done` is: that of worker `done % workers`.
        worker = (worker + done) % workers
        order = self._shard_order()
        positions, (mod, rem) = split_slots(len(order), self.rank, self.num_replicas, worker, workers)
        shards = [order[p] for p in positions]
        if not self.train:
            yield from self._decoded(self._raw(shards, mod, rem))
            return
        per_worker = len(range(worker, self.steps, workers))  # batches of this worker in the whole epoch
        skip = len(range(worker, done, workers)) * self.batch_size  # its samples yielded before `start`
        quota = per_worker * self.batch_size
        if quota == skip:
            return
        B, W = self.batch_size, self.num_replicas

        def position(m: int) -> int:
            """The epoch position of this worker's ``m``-th sample: its place in the rank's batches, interleaved
            over ranks as a sampler's global sequence is (rank r reads positions r, r+W, ...)."""
            return ((worker + workers * (m // B)) * B + m % B) * W + self.rank

        yield from self._train_items(self._stream(shards, mod, rem, worker), skip, quota, position)

    def _stream(self, shards: List[int], mod: int, rem: int, worker: int):
        """A training worker's samples, undecoded and in epoch order, pass after pass over its shards:
        ``(pass, shard, member, image bytes, target, n_skipped_before, original)`` (``original``: not a repeated
        augmentation's copy). Endless: the caller takes its quota."""
        wds = require_shards_extra("webdataset")
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
        pending = 0
        for n_pass in range(1 << 30):
            if n_pass:  # a re-read's order depends only on the shard list: readers splitting it by sample stay in step
                shards = list(shards)
                random.Random(f"{self.seed}:{self.epoch}:{n_pass}:{shards}").shuffle(shards)
            got = 0
            # one shuffle buffer per pass: it drains before a re-read starts, so an epoch repeats no image it
            # has not first drawn once
            stream = wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 128), rng=rng)(
                self._repeated(shards, mod, rem))
            for shard, member, data, target, skipped, original in stream:
                pending += skipped
                if data is None:
                    continue
                got += 1
                yield n_pass, shard, member, data, target, pending, original
                pending = 0
            if got == 0:
                names = ", ".join(os.path.basename(self.split.shards[i]) for i in shards[:4])
                raise DataError(f"no readable sample in shard(s) {names}{' ...' if len(shards) > 4 else ''} of split "
                                f"'{self.split.name}': check them (tar -tvf) or repack with `spach pack`")

    def _train_items(self, stream, skip: int, quota: int, position: Callable[[int], int]):
        """Samples ``skip`` to ``quota`` of a worker's ``stream`` as ``(image, target, replaced)``, the first
        ``skip`` passed over undecoded. Sample ``m`` is a function of the stream up to it (and a little after)
        only, so a worker that skips reads what one that did not reads from there on: an image that does not decode
        is stood in for by the next one of the stream that does (as in an ImageFolder) and counted at its original's
        place in the first pass; each transform draws from the CPU generators seeded by its epoch position."""
        ahead = collections.deque()  # [sample, image] read past the current sample while looking for a stand-in
        for _ in range(skip):
            next(stream)
        with_seeds = seeding._Reseeded
        for m in range(skip, quota):
            entry = ahead.popleft() if ahead else [next(stream), None]
            n_pass, shard, member, data, target, pending, original = entry[0]
            img = entry[1] if entry[1] is not None else self._try_decode(data)
            if isinstance(img, Exception):
                if original and n_pass == 0:  # one count per bad image (copies and re-reads meet it again)
                    pending += self._skip(_Skipped(shard, member, _undecodable(img)))
                img, target = self._stand_in(stream, ahead, n_pass)
            if self.transform is not None:
                with with_seeds() as rng:
                    rng.seed(seeding.sample_seed(self.seed, self.epoch, position(m)))
                    img = self.transform(img)
            yield img, target, pending

    def _stand_in(self, stream, ahead, n_pass: int):
        """The image and target of the first sample after the current one that decodes (decoded once: kept for
        its own turn)."""
        for i in range(1 << 62):
            if i == len(ahead):
                ahead.append([next(stream), None])
            entry = ahead[i]
            # a whole pass read without one image that decodes, or more in a row than memory should hold
            if entry[0][0] > n_pass + 1 or i >= 4 * max(self.shuffle_buffer, 256):
                names = ", ".join(sorted({os.path.basename(e[0][1]) for e in ahead})[:4])
                raise DataError(f"{i + 1} images in a row do not decode, in shard(s) {names} of split "
                                f"'{self.split.name}': check them or repack with `spach pack`")
            if entry[1] is None:
                entry[1] = self._try_decode(entry[0][3])
            if not isinstance(entry[1], Exception):
                return entry[1].copy(), entry[0][4]

    def _try_decode(self, data: bytes):
        """The decoded image, or the error that stopped it."""
        try:
            return self._decode(data)
        except BAD_IMAGE_ERRORS as e:
            return e

    def _decode(self, data: bytes):
        return load_rgb(io.BytesIO(data))

    def _repeated(self, shards: List[int], mod: int, rem: int):
        for sample in self._raw(shards, mod, rem):
            yield sample + (True,)
            if sample[2] is not None:  # repeated augmentation: copies of a sample, spread by the buffer
                for _ in range(self.repeats - 1):
                    yield sample[:4] + (0, False)

    def _raw(self, shards: List[int], mod: int, rem: int):
        """``(shard, member, image bytes, target, n_skipped_before)`` for every kept sample of ``shards``; skipped
        samples add to the next one's count. Samples are numbered as the index places them, damaged or not, so
        the sample split stays disjoint across readers."""
        pending = 0
        running = 0
        for i in shards:
            path = self.split.shards[i]
            start = running
            try:
                for key, sample in self._members(path, self.split.counts[i]):
                    keep = running % mod == rem
                    running += 1
                    if not keep:
                        continue
                    try:
                        member, data, target = self._check(path, key, sample)
                    except _Skipped as s:
                        pending += self._skip(s)
                        continue
                    yield path, member, data, target, pending
                    pending = 0
            except _Skipped as s:  # the shard itself: missing, unreadable, truncated
                end = max(start + self.split.counts[i], running)
                s.count = max(1, _kept(end, mod, rem) - _kept(running, mod, rem))
                running = end
                pending += self._skip(s)
            running = max(running, start + self.split.counts[i])
        if pending:  # damage after the last good sample: a count without an image
            yield None, None, None, None, pending

    def _warn_once(self, shard: str, reason: str, line: str):
        if (shard, reason) not in self._reported:
            self._reported.add((shard, reason))
            logger.warning(line)

    def _skip(self, s: _Skipped) -> int:
        """Log (once per shard and reason) and count a skipped sample; one counted already in this epoch (a re-read
        pass meets the same damage again) counts nothing more."""
        if (s.shard, s.member) in self._counted:
            return 0
        self._counted.add((s.shard, s.member))
        if self.strict:
            raise DataError(f"shard {s.shard}: {s.member}: {s.reason}; repack it (`spach pack`) or drop --strict-data "
                            f"to skip and count bad samples")
        if (s.shard, s.reason) not in self._reported:
            self._reported.add((s.shard, s.reason))
            logger.warning("skipping %s in shard %s (%s); more samples of this shard with the same problem are "
                           "skipped and counted without a line each", s.member, s.shard, s.reason)
        return s.count

    def _open(self, path: str):
        """The shard's byte stream (a benchmark substitutes a slower reader here)."""
        return open_regular(path)  # a FIFO or device in place of a shard is skipped as unreadable, not waited on

    def _members(self, path: str, expected: int):
        """``(key, {suffix: bytes})`` per sample, through webdataset's tar iterators. A shard that is missing,
        truncated or not a tar raises :class:`_Skipped` after the samples read before the damage; so does one that
        ends early without a read error (a tar cut at a member boundary reads as a shorter tar)."""
        from webdataset.tariterators import group_by_keys, tar_file_expander
        try:
            stream = self._open(path)
        except OSError as e:
            raise _Skipped(path, "(whole shard)", f"cannot open it: {e.strerror or e}") from None
        last = ["(first member)"]
        errors = []

        def stop(exn):  # webdataset's handler: remember the error, stop this shard
            errors.append(exn)
            return False

        def named(files):
            for f in files:
                if f.get("fname"):
                    last[0] = f["fname"]
                yield f

        n = 0
        try:
            files = named(tar_file_expander([{"url": path, "stream": stream}], handler=stop))
            for sample in group_by_keys(files, handler=stop):
                if errors:  # a sample completed after a read error is not trusted
                    break
                if n == expected:  # the index is the epoch's definition: its counts, not the tar's, size the split
                    self._warn_once(path, "stale index", f"shard {path} holds more samples than the {expected} its "
                                    f"index lists: only those are read (rewrite the index with `spach pack`)")
                    break
                n += 1
                yield sample["__key__"], sample
        finally:
            stream.close()
        if errors:
            e = errors[0]
            text = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__
            raise _Skipped(path, f"after member {last[0]}", f"truncated or not a tar ({type(e).__name__}: {text})")
        if n < expected:
            raise _Skipped(path, f"after member {last[0]}", f"truncated: it ends after {n} of the {expected} samples "
                                                              f"the index lists")

    def _check(self, path: str, key: str, sample: dict) -> Tuple[str, bytes, int]:
        suffix = next((s for s in IMAGE_SUFFIXES if s in sample), None)
        if suffix is None:
            members = ", ".join(f"{key}.{s}" for s in sample if not s.startswith("__")) or key
            raise _Skipped(path, members, "no image member (.jpg/.png/...)")
        member = f"{key}.{suffix}"
        raw = sample.get("cls")
        if raw is None:
            raise _Skipped(path, member, f"no label ({key}.cls)")
        try:
            target = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise _Skipped(path, f"{key}.cls", f"label {raw[:20]!r} is not a class index") from None
        if not 0 <= target < self.num_classes:
            raise _Skipped(path, f"{key}.cls", f"label {target} is outside the index's {self.num_classes} classes")
        return member, sample[suffix], target

    def _decoded(self, raw):
        """Decoded, transformed items; each carries the count of samples skipped since the one before it. One
        item is held back, so that damage found after the last good sample still counts (on that sample)."""
        held = None
        pending = 0
        for shard, member, data, target, skipped in raw:
            pending += skipped
            if data is None:
                continue
            img = self._try_decode(data)
            if isinstance(img, Exception):
                pending += self._skip(_Skipped(shard, member, _undecodable(img)))
                continue
            if self.transform is not None:
                img = self.transform(img)
            if held is not None:
                yield held
            held, pending = (img, target, pending), 0
        if held is not None:
            yield held[0], held[1], held[2] + pending


# ---------------------------------------------------------------- Hugging Face datasets


class HfdsSource:
    """A Hugging Face dataset on disk: a ``save_to_disk`` folder (``dataset_dict.json``) or a Hub-format local
    copy (parquet / arrow files with or without a README card), with an image column and a class-label column."""

    streaming = False
    kind = "HFDS"

    def __init__(self, root: str, splits: Sequence[str] = ("train", "val")):
        datasets = require_shards_extra("datasets")
        _check_root(root, "HFDS")
        self.root = root
        try:
            if os.path.isfile(os.path.join(root, "dataset_dict.json")):
                dd = datasets.load_from_disk(root)
            else:
                dd = datasets.load_dataset(root)
        except Exception as e:  # the library raises many types for a folder it cannot read
            raise DataError(f"cannot read {root} as a Hugging Face dataset ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}): pass a save_to_disk folder or a "
                            f"local copy of a Hub dataset (parquet files)") from None
        self.tables = {}
        self.classes = None
        ref = None
        for want in splits:
            key = _split_key(dd, want)
            if key is None:
                raise DataError(f"{root} has no '{want}' split (it has {', '.join(sorted(dd)) or 'none'}): the "
                                f"dataset needs 'train' and 'validation' (or 'val') splits")
            table = dd[key]
            image_col, label_col, names = self._columns(table, key)
            if self.classes is None:
                self.classes, ref = names, f"split '{key}'"
            elif names != self.classes:
                _refuse_class_mismatch(self.classes, names, f"{root} split '{key}'", ref)
            table = table.cast_column(image_col, datasets.Image(decode=False))
            self.tables[want] = (table.select_columns([image_col, label_col]), image_col, label_col, key)

    def _columns(self, table, key):
        import datasets
        feats = table.features
        image_col = next((c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
        label_col = next((c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
        if label_col is None and "label" in feats:
            label_col = "label"
        if image_col is None or label_col is None:
            raise DataError(f"{self.root} split '{key}' has columns {', '.join(feats)}: it needs an Image column and "
                            f"a ClassLabel (or integer 'label') column")
        f = feats[label_col]
        if isinstance(f, datasets.ClassLabel):
            names = list(f.names)
        else:
            labels = [x for x in table[label_col] if x is not None]
            names = [str(i) for i in range(max(labels) + 1)] if labels else []
        if not names:
            raise DataError(f"{self.root} split '{key}' has no class labels: label column {label_col!r} is empty")
        return image_col, label_col, names

    def count(self, split: str) -> int:
        return len(self.tables[split][0])

    def dataset(self, split: str, transform: Optional[Callable], *, strict: bool = False, **_ignored):
        table, image_col, label_col, key = self.tables[split]
        return HfImageDataset(table, image_col, label_col, len(self.classes), transform, strict=strict,
                              where=f"{self.root} split '{key}'")


class HfImageDataset:
    """Rows of a Hugging Face table as ``(image, target, replaced)``, with the ImageFolder's rule for a bad row
    (an undecodable image or a missing / out-of-range label): the next readable row stands in and the item is
    flagged, or, with ``strict``, a :class:`DataError` names the row."""

    max_tries = 50

    def __init__(self, table, image_col: str, label_col: str, num_classes: int, transform=None, *,
                 strict: bool = False, where: str = ""):
        self.table, self.image_col, self.label_col = table, image_col, label_col
        self.num_classes = num_classes
        self.transform = transform
        self.strict = strict
        self.where = where
        self._reported = set()

    def __len__(self):
        return len(self.table)

    def _row(self, index: int):
        row = self.table[index]
        target = row[self.label_col]
        if target is None or not 0 <= int(target) < self.num_classes:
            raise _Skipped(self.where, f"row {index}", f"label {target!r} is missing or outside the "
                                                       f"{self.num_classes} classes")
        cell = row[self.image_col] or {}
        data = cell.get("bytes")
        if data is None and cell.get("path"):
            try:
                with open_regular(cell["path"]) as f:  # never waits on a FIFO named by the dataset
                    data = f.read()
            except (OSError, TypeError, ValueError) as e:
                raise _Skipped(self.where, f"row {index}", f"its image file {cell['path']!r:.80} cannot be read "
                               f"({e.strerror if isinstance(e, OSError) and e.strerror else e})") from None
        if not data:
            raise _Skipped(self.where, f"row {index}", "no image bytes")
        try:
            img = load_rgb(io.BytesIO(data))
        except BAD_IMAGE_ERRORS as e:
            raise _Skipped(self.where, f"row {index}", f"not a decodable image ({type(e).__name__})") from None
        return img, int(target)

    def __getitem__(self, index: int):
        n_bad = 0
        for attempt in range(self.max_tries):
            i = (index + attempt) % len(self.table)
            try:
                img, target = self._row(i)
            except _Skipped as s:
                if self.strict:
                    raise DataError(f"{s.shard}, {s.member}: {s.reason}; fix the dataset or drop --strict-data to "
                                    f"skip and count bad rows") from None
                if s.member not in self._reported:
                    self._reported.add(s.member)
                    logger.warning("skipping %s of %s (%s)", s.member, s.shard, s.reason)
                n_bad += 1
                continue
            return (self.transform(img) if self.transform is not None else img), target, int(n_bad > 0)
        raise DataError(f"{self.max_tries} rows in a row from row {index} of {self.where} could not be read: the "
                        f"dataset looks corrupt")


def open_source(kind: str, root: str, splits: Sequence[str] = ("train", "val")):
    """The checked ``--data-set WDS`` / ``HFDS`` source at ``root``."""
    return {"WDS": WdsSource, "HFDS": HfdsSource}[kind](root, splits)
