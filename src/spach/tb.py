"""TensorBoard scalars for training runs (optional: ``pip install 'spach[tensorboard]'``).

The training loop calls :func:`write_tensorboard_scalars` once per epoch with the same stats dict it
appends to ``log.txt`` (``train_loss``, ``train_lr``, ``test_acc1`` ...); ``spach plot --tensorboard``
replays finished runs' ``log.txt`` through the same function. Keys become tags ``train/loss``,
``train/lr``, ``test/acc1`` ...; non-numeric values and bookkeeping keys (``epoch``, ``n_parameters``)
are skipped.
"""
import math
import numbers
from typing import Dict

from .errors import SpachError

__all__ = ["TensorBoardWriter", "write_tensorboard_scalars", "close_tensorboard_writers", "scalar_tags",
           "require_tensorboard", "TENSORBOARD_INSTALL"]

TENSORBOARD_INSTALL = "--tensorboard needs the tensorboard package: pip install 'spach[tensorboard]'"
_SKIP = ("epoch", "n_parameters")


def scalar_tags(stats: dict) -> Dict[str, float]:
    """The stats that are plottable scalars, under their TensorBoard tags (``train_loss`` -> ``train/loss``)."""
    out = {}
    for key, value in stats.items():
        if key in _SKIP or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = float(value)
        if not math.isfinite(value):
            continue
        for prefix in ("train", "test", "val"):
            if key.startswith(prefix + "_"):
                key = f"{prefix}/{key[len(prefix) + 1:]}"
                break
        out[key] = value
    return out


def require_tensorboard():
    """Raise :class:`SpachError` with the install command unless TensorBoard's writer can be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:  # torch raises ImportError when the tensorboard package is absent
        raise SpachError(TENSORBOARD_INSTALL) from None


class TensorBoardWriter:
    """A ``torch.utils.tensorboard.SummaryWriter`` for one run folder; :meth:`write` one epoch's stats."""

    def __init__(self, log_dir: str):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=log_dir)

    def write(self, stats: dict, epoch: int) -> int:
        """Write the scalars of ``stats`` at step ``epoch``; returns how many were written."""
        tags = scalar_tags(stats)
        for tag, value in tags.items():
            self._writer.add_scalar(tag, value, global_step=int(epoch))
        self._writer.flush()
        return len(tags)

    def close(self):
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_WRITERS: Dict[str, TensorBoardWriter] = {}


def write_tensorboard_scalars(log_dir: str, stats: dict, epoch: int) -> int:
    """Append one epoch's ``stats`` to the TensorBoard events in ``log_dir`` (one writer per folder is kept
    open between calls; :func:`close_tensorboard_writers` closes them). Returns the number of scalars.
    Raises :class:`SpachError` with the install command when tensorboard is missing."""
    writer = _WRITERS.get(log_dir)
    if writer is None:
        writer = _WRITERS[log_dir] = TensorBoardWriter(log_dir)
    return writer.write(stats, epoch)


def close_tensorboard_writers():
    """Flush and close every writer :func:`write_tensorboard_scalars` opened."""
    while _WRITERS:
        _, writer = _WRITERS.popitem()
        writer.close()
