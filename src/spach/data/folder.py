"""ImageFolder datasets checked before training, and a loader that survives bad images.

``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>`` (the torchvision ImageFolder layout). Every
problem a user can cause (missing folder, missing split, empty class, val classes that differ from train
classes, a batch larger than the data) is found before the first step and reported as one
:class:`~spach.errors.DataError` naming the path and the fix.

An image that cannot be decoded (truncated, zero bytes, not an image, removed or unreadable since the scan)
is logged with its path and replaced by the next readable sample; each sample carries a flag saying whether
it was replaced, so the engine can count unreadable files per epoch. With ``strict=True`` it is an error.
"""
import contextlib
import logging
import os
import stat
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..files import open_regular, under

__all__ = ["IMG_EXTENSIONS", "find_classes", "scan_split", "scan_images", "walk_images", "is_image_name",
           "check_dataset", "TolerantImageFolder", "load_rgb", "to_rgb", "BAD_IMAGE_ERRORS"]

logger = logging.getLogger("spach.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# what PIL / the OS raise for a file that is not a decodable image (or vanished / became unreadable)
BAD_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class TransformFailed(ValueError):
    """A file that decodes as an image but that the transform cannot take (an image too small for a crop)."""


def find_classes(split_dir: str) -> List[str]:
    """Sorted class folder names of one split (hidden folders ignored)."""
    try:
        entries = list(os.scandir(split_dir))
    except PermissionError:
        raise DataError(f"cannot read {split_dir}: permission denied; make it readable (chmod -R a+rX)") from None
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def is_image_name(name: str) -> bool:
    """A file name the readers take as an image: an image extension (any case), not hidden."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _entry_problem(entry: os.DirEntry) -> Optional[str]:
    """None for a regular file or a link to one; else why the entry is left out, as a :class:`_Skipped` reason.
    A FIFO, socket or device is never opened (reading a FIFO blocks forever)."""
    if not entry.is_symlink():
        if entry.is_file(follow_symlinks=False):
            return None
        return "special files named like images (FIFO, socket, device): never opened"
    try:
        st = os.stat(entry.path)
    except OSError:
        return "broken links"
    return None if stat.S_ISREG(st.st_mode) else "links to special files (FIFO, socket, device)"


class _Skipped:
    """What a scan left out, by reason, reported as one warning line per reason."""

    def __init__(self):
        self.by_reason: Dict[str, List[str]] = {}

    def add(self, reason: str, what: str):
        self.by_reason.setdefault(reason, []).append(what)

    def lines(self, folder: str) -> List[str]:
        """One line per reason: how many, and the first three."""
        out = []
        for reason, items in self.by_reason.items():
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            out.append(f"{folder}: skipped {len(items)} {reason}: {'; '.join(items[:3])}{more}")
        return out

    def report(self, split_dir: str):
        for line in self.lines(split_dir):
            logger.warning(line)


class _SplitScan:
    """The class folders of one split, walked as :func:`scan_split` describes; ``skipped`` collects what was left
    out."""

    def __init__(self, split_dir: str, classes: Sequence[str]):
        self.skipped = _Skipped()
        self.class_dirs = [os.path.join(split_dir, name) for name in classes]
        self.reals = [os.path.realpath(d) for d in self.class_dirs]
        self.owner: Dict[str, int] = {}  # real path of a class folder -> its class index
        for idx, real in enumerate(self.reals):
            if real in self.owner:
                raise DataError(f"class folders {self.class_dirs[self.owner[real]]} and {self.class_dirs[idx]} are "
                                f"the same folder ({real}): every image would get two labels; give each class its "
                                f"own folder")
            self.owner[real] = idx

    def class_of(self, real_path: str) -> Optional[int]:
        """The class whose folder holds ``real_path`` (None: outside every class folder of this split)."""
        folder = os.path.dirname(real_path)
        while True:
            if folder in self.owner:
                return self.owner[folder]
            parent = os.path.dirname(folder)
            if parent == folder:
                return None
            folder = parent

    def images(self, idx: int) -> List[Tuple[str, str]]:
        """``(path, real path)`` of every image of class ``idx``, depth first in name order."""
        files, seen, visited = [], set(), {self.reals[idx]}
        stack = [(self.class_dirs[idx], self.reals[idx])]
        while stack:
            folder, real_folder = stack.pop()
            entries = _sorted_entries(folder)
            subdirs = []
            for entry in entries:
                if entry.is_dir():  # follows links
                    sub = self._subfolder(idx, entry, real_folder, visited)
                    if sub is not None:
                        subdirs.append(sub)
                    continue
                real = self._image(idx, entry, real_folder)
                if real is None:
                    continue
                if real in seen:
                    self.skipped.add("images reached twice in one class folder (through a link), counted once",
                                     entry.path)
                    continue
                seen.add(real)
                files.append((entry.path, real))
            stack.extend(reversed(subdirs))  # depth first, in name order
        return files

    def _subfolder(self, idx: int, entry, real_folder: str, visited: set) -> Optional[Tuple[str, str]]:
        """``(path, real path)`` of a folder entry to walk into, or None (left out, and why recorded)."""
        link = entry.is_symlink()
        real = os.path.realpath(entry.path) if link else os.path.join(real_folder, entry.name)
        other = self.owner.get(real)
        if other is not None and other != idx:
            self.skipped.add("links to another class's folder", f"{entry.path} -> {self.class_dirs[other]}")
        elif link and not under(real, self.reals[idx]):
            self.skipped.add("folder links leading out of their class folder", f"{entry.path} -> {real}")
        elif real in visited:
            if link:
                self.skipped.add("folder links to a folder already scanned (a cycle or a duplicate)",
                                 f"{entry.path} -> {real}")
        else:
            visited.add(real)
            return entry.path, real
        return None

    def _image(self, idx: int, entry, real_folder: str) -> Optional[str]:
        """The real path of a file entry that is an image of class ``idx``, or None (not an image name, or left
        out and why recorded)."""
        if not is_image_name(entry.name):
            return None
        problem = _entry_problem(entry)
        if problem:
            self.skipped.add(problem, entry.path)
            return None
        if not entry.is_symlink():
            return os.path.join(real_folder, entry.name)
        real = os.path.realpath(entry.path)
        other = self.class_of(real)
        if other is not None and other != idx:
            self.skipped.add("links to another class's image", f"{entry.path} -> {real}")
            return None
        return real


def scan_split(split_dir: str, classes: Sequence[str]) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    """All image files of a split as ``(path, class_index)``, and the per-class count.

    Links are followed only where they cannot mislabel: a folder link is followed only to a folder inside its
    own class folder that has not been scanned yet (never out of the class folder, never around a cycle); a
    file link is followed unless it leads into another class's folder, and an image reached twice counts
    once. An image reachable from two class folders (through links to one file outside the split) gets no
    label at all rather than two. FIFOs, sockets and devices named like images are never opened. Whatever is
    left out is logged, one warning line per reason.
    """
    scan = _SplitScan(split_dir, classes)
    per_class = [scan.images(idx) for idx in range(len(classes))]
    claims: Dict[str, int] = {}
    for files in per_class:
        for _, real in files:
            claims[real] = claims.get(real, 0) + 1
    samples, counts = [], {}
    for idx, (name, files) in enumerate(zip(classes, per_class)):
        kept = []
        for path, real in files:
            if claims[real] > 1:
                scan.skipped.add("images linked from more than one class folder (no label is right)",
                                 f"{path} -> {real}")
            else:
                kept.append((path, idx))
        counts[name] = len(kept)
        samples.extend(kept)
    scan.skipped.report(split_dir)
    return samples, counts


def scan_images(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``(samples, classes)`` of the images under ``root`` (``root/train`` if it exists): its class sub-folders
    as :func:`scan_split` reads them, or, without sub-folders, the images directly in it as one class ``images``.
    May be empty; the caller says which flag to fix."""
    base = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    classes = find_classes(base)
    if classes:
        return scan_split(base, classes)[0], classes
    files = sorted(e.name for e in os.scandir(base) if e.is_file() and not e.name.startswith("."))
    return [(os.path.join(base, f), 0) for f in files if f.lower().endswith(IMG_EXTENSIONS)], ["images"]


def walk_images(folder: str) -> Tuple[List[str], List[str]]:
    """Every image file under ``folder`` (a folder's files, then its sub-folders, each in name order), and what
    was left out as lines for a warning (one per reason).

    As :func:`scan_split` reads a class folder, but with no labels at stake: a folder link is followed once per
    real folder (never around a cycle, wherever it leads); FIFOs, sockets, devices and broken links named like
    images are never opened. An unreadable folder is a :class:`~spach.errors.DataError` naming it.
    """
    skipped = _Skipped()
    files, visited = [], {os.path.realpath(folder)}
    stack = [(folder, os.path.realpath(folder))]
    while stack:
        current, real_current = stack.pop()
        entries = _sorted_entries(current)
        subdirs = []
        for entry in entries:
            if entry.is_dir():  # follows links
                link = entry.is_symlink()
                real = os.path.realpath(entry.path) if link else os.path.join(real_current, entry.name)
                if real not in visited:
                    visited.add(real)
                    subdirs.append((entry.path, real))
                elif link:
                    skipped.add("folder links to a folder already walked (a cycle or a duplicate)",
                                f"{entry.path} -> {real}")
            elif is_image_name(entry.name):
                problem = _entry_problem(entry)
                if problem:
                    skipped.add(problem, entry.path)
                else:
                    files.append(entry.path)
        stack.extend(reversed(subdirs))  # depth first, in name order
    return files, skipped.lines(folder)


def _sorted_entries(folder: str) -> list:
    """A folder's entries in name order (both walks go depth first in name order); an unreadable folder is a
    :class:`~spach.errors.DataError` naming it."""
    try:
        return sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot read {e.filename or folder}: {e.strerror}; fix its permissions (chmod -R a+rX)") \
            from None


def class_difference(ref: Sequence[str], other: Sequence[str], ref_name: str, other_name: str) -> str:
    """What tells two class lists apart, for a message: the names only one side has (five at most each)."""
    detail = []
    for side, names in ((ref_name, sorted(set(ref) - set(other))), (other_name, sorted(set(other) - set(ref)))):
        if names:
            detail.append(f"only in {side}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
    return "; ".join(detail) or "same names in another order"


def check_dataset(data_path: str, splits=("train", "val")) -> Tuple[List[str], Dict[str, list]]:
    """Check an ImageFolder dataset; return the class names and the samples of each split."""
    if not data_path or not os.path.exists(data_path):
        raise DataError(f"dataset folder {data_path!r} does not exist: pass --data-path DIR with DIR/train/<class>/"
                        f"<images> and DIR/val/<class>/<images> (or omit --data-path to train on the demo data)")
    if not os.path.isdir(data_path):
        raise DataError(f"--data-path {data_path} is a file, not a folder: pass the folder that holds train/ and val/")
    classes = None
    samples = {}
    for split in splits:
        split_dir = os.path.join(data_path, split)
        if not os.path.isdir(split_dir):
            raise DataError(f"{split_dir} is missing: the dataset needs {split}/<class>/<images> under {data_path} "
                            f"(ImageFolder layout, like ImageNet's train/ and val/)")
        names = find_classes(split_dir)
        if not names:
            raise DataError(f"{split_dir} has no class folders: put each class's images in {split_dir}/<class>/")
        if classes is None:
            classes = names
        elif names != classes:
            raise DataError(f"the classes of {split_dir} differ from those of {os.path.join(data_path, splits[0])} "
                            f"({class_difference(classes, names, 'train/', f'{split}/')}): both splits need the same "
                            f"class folders")
        split_samples, counts = scan_split(split_dir, names)
        empty = [n for n, c in counts.items() if c == 0]
        if empty:
            raise DataError(f"class folder {os.path.join(split_dir, empty[0])} has no images"
                            + (f" (and {len(empty) - 1} more empty classes)" if len(empty) > 1 else "")
                            + f": add images ({', '.join(IMG_EXTENSIONS[:3])} ...) or remove the folder from "
                            f"every split")
        samples[split] = split_samples
    return classes, samples


EMPTY_FILE = "empty file (0 bytes)"


def load_rgb(path) -> Image.Image:
    """Open and fully decode an image as RGB (grayscale, CMYK, palette and RGBA all convert; the format is
    read from the content, so a PNG named .JPEG works). ``path`` may also be a binary file object (a shard
    member's bytes). A FIFO or device named like an image is an unreadable file, not a hang."""
    with (open_regular(path) if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path)) as f:
        if isinstance(path, (str, os.PathLike)) and os.fstat(f.fileno()).st_size == 0:
            raise OSError(EMPTY_FILE)  # one wording for this fact, in training and in predict
        img = Image.open(f)
        check_image_shape(img.size)  # from the header, before decoding
        img.load()  # decode now: a truncated file fails here, not later inside a transform
        return to_rgb(img) if img.mode != "RGB" else img.convert("RGB")  # a copy, detached from the file


# an image is resized by its shorter side: a 1 x 250,000 strip would become 256 x 64,000,000 pixels (GBs)
MAX_ASPECT = 100


class ImageShapeError(ValueError):
    """An image whose shape no pipeline should resize (counted as unreadable, with this reason)."""


def check_image_shape(size):
    """Refuse an image whose decoded work is unbounded: an aspect ratio beyond :data:`MAX_ASPECT` (Pillow's own
    pixel limit, ``Image.MAX_IMAGE_PIXELS``, bounds the decoding)."""
    w, h = size
    if w < 1 or h < 1:
        raise ImageShapeError(f"it is {w}x{h} pixels")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageShapeError(f"it is {w}x{h} pixels, an aspect ratio beyond {MAX_ASPECT}:1 that a resize by the "
                              f"shorter side would blow up")


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float single-channel images (PNG I;16, TIFF I / F) as 8-bit grayscale, scaled
    rather than clipped: Pillow's own conversion clips 16-bit values at 255 (an almost white image) and floats in
    [0, 1] to 0 or 1 (black)."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        a = a.astype(np.float32) / 257.0  # 0..65535 -> 0..255
    else:
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"its {img.mode} pixels are not all finite (NaN or inf)")
        lo, hi = float(a.min()), float(a.max())
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0  # the usual float image: intensities in [0, 1]
        elif lo < 0.0 or hi > 255.0:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)  # stretch the range it uses
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB; transparent pixels (RGBA, LA, palette with transparency) become white, not black;
    high-depth single-channel images are scaled to 8 bits (:func:`_eight_bit`)."""
    check_image_shape(img.size)
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _eight_bit(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


class TolerantImageFolder:
    """An ImageFolder split whose items are ``(image, target, replaced)``.

    ``replaced`` is 1 when this item's own file could not be read and the next readable sample stands in for
    it (0 normally), so summing it over an epoch counts the unreadable files drawn. Replacement is
    deterministic (the next index), so a seeded run stays reproducible.
    """

    max_tries = 50

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str],
                 transform: Optional[Callable] = None, strict: bool = False):
        self.samples = list(samples)
        self.targets = [t for _, t in self.samples]
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        self.strict = strict
        self._reported = set()  # paths already logged by this process

    def __len__(self):
        return len(self.samples)

    def _report(self, path: str, err: Exception):
        if path not in self._reported:
            self._reported.add(path)
            reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            what = "image" if isinstance(err, TransformFailed) else "unreadable image"
            logger.warning("skipping %s %s (%s)", what, path, reason)

    def _read(self, path: str):
        """The transformed sample of one file (subclasses may read differently, e.g. from the path)."""
        img = load_rgb(path)
        if self.transform is None:
            return img
        try:
            return self.transform(img)
        except BAD_IMAGE_ERRORS as e:  # the file decoded: say that the transform failed, not the decoding
            raise TransformFailed(f"it decodes ({img.size[0]}x{img.size[1]}) but the transform failed: "
                                  f"{type(e).__name__}: {e}") from None

    def __getitem__(self, index: int):
        n_bad = 0
        for attempt in range(self.max_tries):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self._read(path)
            except BAD_IMAGE_ERRORS as e:
                if self.strict:
                    reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    verb = "cannot use" if isinstance(e, TransformFailed) else "cannot decode"
                    raise DataError(f"{verb} image {path} ({reason}); remove or replace the file, or drop "
                                    f"--strict-data to skip unreadable images") from None
                self._report(path, e)
                n_bad += 1
                continue
            return img, target, int(n_bad > 0)  # 1: this item's own file was unreadable
        raise DataError(f"{self.max_tries} images in a row from {self.samples[index][0]} on could not be decoded: "
                        f"the dataset looks corrupt or unreadable; check the files and their permissions")
