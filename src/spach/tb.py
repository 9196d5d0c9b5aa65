"""TensorBoard scalars for training runs (optional: ``pip install 'spach[tensorboard]'``).

The training loop's TensorBoard sink (:mod:`spach.train.metrics`) writes each epoch's stats dict, the one it
appends to ``log.txt`` (``train_loss``, ``train_lr``, ``test_acc1`` ...), and each logged step's scalars through
:class:`TensorBoardWriter`; ``spach plot --tensorboard`` replays finished runs' ``log.txt`` through the same class. Keys become tags ``train/loss``,
``train/lr``, ``test/acc1`` ...; non-numeric values and bookkeeping keys (``epoch``, ``n_parameters``)
are skipped.
"""
import math
import numbers
from typing import Dict

from .errors import SpachError

__all__ = ["TensorBoardWriter", "scalar_tags", "require_tensorboard", "TENSORBOARD_INSTALL"]

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
        for prefix in ("train", "test", "val", "step"):
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

    def write(self, stats: dict, step: int, flush: bool = True) -> int:
        """Write the scalars of ``stats`` at ``step``; returns how many were written. Per-step calls pass
        ``flush=False``: the writer's own thread flushes them every few seconds, off the training loop."""
        tags = scalar_tags(stats)
        for tag, value in tags.items():
            self._writer.add_scalar(tag, value, global_step=int(step))
        if flush:
            self._writer.flush()
        return len(tags)

    def close(self):
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
