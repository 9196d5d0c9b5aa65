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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

from ..errors import DataError

__all__ = ["IMG_EXTENSIONS", "find_classes", "scan_split", "scan_images", "check_dataset", "TolerantImageFolder",
           "load_rgb", "to_rgb", "BAD_IMAGE_ERRORS"]

logger = logging.getLogger("spach.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# what PIL / the OS raise for a file that is not a decodable image (or vanished / became unreadable)
BAD_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def find_classes(split_dir: str) -> List[str]:
    """Sorted class folder names of one split (hidden folders ignored)."""
    try:
        entries = list(os.scandir(split_dir))
    except PermissionError:
        raise DataError(f"cannot read {split_dir}: permission denied; make it readable (chmod -R a+rX)") from None
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def scan_split(split_dir: str, classes: Sequence[str]) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    """All image files of a split as ``(path, class_index)``, and the per-class count."""
    samples, counts = [], {}
    for idx, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        files = []
        for root, dirs, fnames in os.walk(class_dir, followlinks=True, onerror=_raise_walk_error):
            dirs.sort()
            for f in sorted(fnames):
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                    files.append((os.path.join(root, f), idx))
        counts[name] = len(files)
        samples.extend(files)
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


def _raise_walk_error(err: OSError):
    raise DataError(f"cannot read {err.filename}: {err.strerror}; fix its permissions (chmod -R a+rX)")


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
            only_train = sorted(set(classes) - set(names))
            only_val = sorted(set(names) - set(classes))
            detail = []
            if only_train:
                detail.append(f"only in train/: {', '.join(only_train[:5])}" + (" ..." if len(only_train) > 5 else ""))
            if only_val:
                detail.append(f"only in {split}/: {', '.join(only_val[:5])}" + (" ..." if len(only_val) > 5 else ""))
            raise DataError(f"the classes of {split_dir} differ from those of {os.path.join(data_path, splits[0])} "
                            f"({'; '.join(detail)}): both splits need the same class folders")
        split_samples, counts = scan_split(split_dir, names)
        empty = [n for n, c in counts.items() if c == 0]
        if empty:
            raise DataError(f"class folder {os.path.join(split_dir, empty[0])} has no images"
                            + (f" (and {len(empty) - 1} more empty classes)" if len(empty) > 1 else "")
                            + f": add images ({', '.join(IMG_EXTENSIONS[:3])} ...) or remove the folder from "
                            f"every split")
        samples[split] = split_samples
    return classes, samples


def load_rgb(path) -> Image.Image:
    """Open and fully decode an image as RGB (grayscale, CMYK, palette and RGBA all convert; the format is
    read from the content, so a PNG named .JPEG works). ``path`` may also be a binary file object (a shard
    member's bytes)."""
    with (open(path, "rb") if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path)) as f:
        img = Image.open(f)
        img.load()  # decode now: a truncated file fails here, not later inside a transform
        return to_rgb(img) if img.mode != "RGB" else img.convert("RGB")  # a copy, detached from the file


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB; transparent pixels (RGBA, palette with transparency) become white, not black."""
    if img.mode == "RGB":
        return img
    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
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
            logger.warning("skipping unreadable image %s (%s)", path, reason)

    def _read(self, path: str):
        """The transformed sample of one file (subclasses may read differently, e.g. from the path)."""
        img = load_rgb(path)
        return self.transform(img) if self.transform is not None else img

    def __getitem__(self, index: int):
        n_bad = 0
        for attempt in range(self.max_tries):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                if os.path.getsize(path) == 0:
                    raise OSError("empty file (0 bytes)")
                img = self._read(path)
            except BAD_IMAGE_ERRORS as e:
                if self.strict:
                    reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    raise DataError(f"cannot decode image {path} ({reason}); remove or replace the file, or drop "
                                    f"--strict-data to skip unreadable images") from None
                self._report(path, e)
                n_bad += 1
                continue
            return img, target, int(n_bad > 0)  # 1: this item's own file was unreadable
        raise DataError(f"{self.max_tries} images in a row from {self.samples[index][0]} on could not be decoded: "
                        f"the dataset looks corrupt or unreadable; check the files and their permissions")
