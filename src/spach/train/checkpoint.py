"""Training checkpoints: the original layout, written atomically, read without running code.

Layout (as SPACH / DeiT ``main.py``): ``model``, ``optimizer``, ``lr_scheduler``, ``epoch``, ``model_ema``,
``scaler``, ``args`` (a plain dict of the flags, so ``weights_only`` loading accepts it), plus what an exact
resume needs: ``rng`` (torch / cuda / numpy / python states), ``sampler_epoch``, ``max_accuracy``, ``steps``,
and ``class_names`` (the class folder names, index order).

A write goes to a temporary file in the same folder, is fsync'ed, then renamed over the old file, so a kill or
a full disk at any moment leaves either the old or the new checkpoint, never a torn one.
"""
import glob
import io
import os
import random
import tempfile

import numpy as np
import torch

from ..errors import CheckpointError
from ..files import regular_file_problem
from ..weights import open_weights
from . import faults

__all__ = ["atomic_save", "atomic_write", "open_checkpoint", "load_checkpoint", "get_rng_state", "set_rng_state", "CHECKPOINT_NAME", "BEST_NAME",
           "RECOVERY_NAME", "position"]

CHECKPOINT_NAME = "checkpoint.pth"
BEST_NAME = "best.pth"
RECOVERY_NAME = "recovery.pth"  # the state in the middle of an epoch (--recovery-interval, or a stop signal)


def atomic_save(obj, path: str):
    """``torch.save`` to ``path`` atomically. On failure the previous file is untouched and a
    :class:`CheckpointError` says so."""
    def write(f):
        name = os.path.basename(path)
        if faults.armed(f"write:{name}"):  # test hook: die with half the bytes on disk
            buf = io.BytesIO()
            torch.save(obj, buf)
            f.write(buf.getbuffer()[:buf.tell() // 2])
            f.flush()
            faults.point(f"write:{name}")
        torch.save(obj, f)
    atomic_write(path, write)


def atomic_write(path: str, write, what: str = "checkpoint"):
    """``write(f)`` into a temporary file beside ``path`` (binary), fsync'ed and renamed over ``path``. On failure
    the previous file is untouched and a :class:`CheckpointError` names ``what`` failed and why."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    name = os.path.basename(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        # temp files of writers killed mid-write (pre-emption while saving) would otherwise pile up
        for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
            try:
                os.remove(stale)
            except OSError:
                pass
        try:  # make the rename itself durable
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        faults.point(f"saved:{name}")
    except (OSError, RuntimeError) as e:
        while not isinstance(e, OSError) and isinstance(e.__context__, (OSError, RuntimeError)):
            e = e.__context__  # torch.save reports a full disk as "unexpected pos"; the OSError is its context
        kept = f"the previous {path} is kept" if os.path.exists(path) else f"no earlier {name} exists"
        raise CheckpointError(f"could not write {what} {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              f"{kept}. Free disk space or fix the folder's permissions, then rerun the same "
                              f"command to resume.") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


def open_checkpoint(path: str):
    """A training checkpoint, opened once as a :class:`~spach.weights.WeightsFile` (``weights_only``: tensors and
    plain containers only); its entries are ``.contents``."""
    problem = regular_file_problem(path)
    if problem:  # the weights reader's hint would offer .safetensors or folders, which cannot resume
        raise CheckpointError(f"checkpoint {path} {problem}: pass the path of a checkpoint.pth / best.pth")
    weights = open_weights(path, mapped=False)  # the optimizer keeps its state tensors as loaded
    if not isinstance(weights.contents, dict) or "model" not in weights.contents:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'model' entry): use --finetune or "
                              f"--checkpoint for a bare weights file")
    return weights


def position(ckpt: dict):
    """Where a checkpoint's state stands in its run: ``(epoch, step)``, the next step to train. An epoch checkpoint
    stands at step 0 of the epoch after its ``epoch``; a recovery checkpoint at its recorded step."""
    rec = ckpt.get("recovery")
    if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and isinstance(rec.get("step"), int):
        return rec["epoch"], rec["step"]
    epoch = ckpt.get("epoch")
    return (epoch + 1 if isinstance(epoch, int) and not isinstance(epoch, bool) else 0), 0


def load_checkpoint(path: str) -> dict:
    """A training checkpoint's entries (see :func:`open_checkpoint`)."""
    return open_checkpoint(path).contents


def get_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "npu") and hasattr(torch.npu, "get_rng_state_all"):
        try:
            state["npu"] = torch.npu.get_rng_state_all()
        except Exception:
            pass
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if "npu" in state and hasattr(torch, "npu"):
        try:
            torch.npu.set_rng_state_all(state["npu"])
        except Exception:
            pass
