"""Writing a run's state: the epoch checkpoint (``checkpoint.pth``, ``best.pth``, then log.txt's line) and the
mid-epoch recovery checkpoint (``recovery.pth``).

Both hold the same training state (weights, optimizer, EMA, scaler, every rank's RNG state, the trackers' run
ids), written by rank 0 atomically; every rank learns whether the write worked. A recovery checkpoint adds where
the epoch stands (step, samples consumed, each rank's share of the epoch's stats) and carries the last finished
epoch's log line, so that a resume from it ends exactly as an uninterrupted run.
"""
import json
import logging
import os

import torch

from ..errors import CheckpointError
from ..files import open_own
from ..runtime import device as devices
from .checkpoint import BEST_NAME, CHECKPOINT_NAME, RECOVERY_NAME, atomic_save, get_rng_state
from .history import keep_history

__all__ = ["save_epoch", "save_recovery", "drop_recovery", "gather_rng"]

logger = logging.getLogger("spach.train")


def gather_rng(dist_info):
    """This rank's RNG state and every rank's (a collective: every rank calls it)."""
    state = get_rng_state()
    if dist_info.distributed:
        states = [None] * dist_info.world_size
        torch.distributed.all_gather_object(states, state)
        return state, states
    return state, [state]


def _gather(dist_info, obj):
    if dist_info.distributed:
        out = [None] * dist_info.world_size
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def _state(run, epoch, max_accuracy, rng, rng_all, tracking, global_step, log_stats) -> dict:
    step, cfg = run.step, run.cfg
    return {
        "model": step.model.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "lr_scheduler": run.schedule.state_dict(),
        "epoch": epoch,
        "model_ema": step.ema.module.state_dict() if step.ema is not None else None,
        "scaler": step.scaler.state_dict() if step.scaler is not None else None,
        "args": cfg.checkpoint_args(),
        "max_accuracy": max_accuracy,
        "sampler_epoch": epoch + 1,
        "rng": rng,
        "rng_per_rank": rng_all,
        "class_names": list(run.data.class_names),
        "world_size": run.dist.world_size,
        # what the global batch was made of: a resume keeps the global batch, however it is made up then
        "layout": {"global_batch": cfg.optim.global_batch, "world_size": run.dist.world_size,
                   "batch_size": cfg.optim.batch_size, "grad_accum_steps": cfg.optim.grad_accum_steps},
        "log_stats": log_stats,  # restores log.txt's line after a kill between the two writes
        "tracking": tracking,  # the W&B / MLflow runs a resume continues
        "global_step": global_step,
    }


def _write(run, names, state_fn, stopped_why: str):
    """Rank 0 builds the state and writes it under ``names`` (in order; the last is the commit point); every rank
    learns whether it worked."""
    folder = run.cfg.output.output_dir
    error = None
    if run.dist.is_main:
        state = state_fn()
        try:
            for name in names:
                atomic_save(state, os.path.join(folder, name))
        except CheckpointError as e:
            error = str(e)
        del state
    error = devices.broadcast_object(error)
    if error:
        raise CheckpointError(error + " " + stopped_why)


def save_epoch(run, epoch, log_stats, max_accuracy, improved, rng, rng_all, tracking, global_step) -> str:
    """checkpoint.pth (and best.pth when the accuracy improved), then log.txt's line; rank 0 writes, every rank
    learns whether it worked. Returns the checkpoint now to restart from."""
    folder = run.cfg.output.output_dir
    # checkpoint.pth last: it is the commit point. A kill before it reruns this epoch, which rewrites best.pth;
    # the other order could leave best.pth an epoch behind for good.
    names = ((BEST_NAME,) if improved else ()) + (CHECKPOINT_NAME,)
    _write(run, names, lambda: _state(run, epoch, max_accuracy, rng, rng_all, tracking, global_step, log_stats),
           "Training stopped so that no epoch goes unsaved.")
    if run.dist.is_main:
        keep_history(run.cfg.output, epoch, log_stats)  # --checkpoint-hist: after checkpoint.pth is committed
        log = os.path.join(folder, "log.txt")
        with os.fdopen(open_own(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what="log file"), "a") as f:
            f.write(json.dumps(log_stats) + "\n")
    return os.path.join(folder, CHECKPOINT_NAME)


def save_recovery(run, epoch, steps_done, progress, max_accuracy, tracking, global_step, last_log) -> str:
    """recovery.pth after optimizer step ``steps_done`` of ``epoch``: the training state, where the epoch stands
    and every rank's share of its stats (``progress``, this rank's :class:`~spach.train.engine.EpochProgress`).
    A collective: every rank calls it at the same step. Returns the file's path."""
    rng, rng_all = gather_rng(run.dist)
    shares = _gather(run.dist, progress.state_dict())
    recovery = {"epoch": epoch, "step": steps_done, "samples": steps_done * run.cfg.optim.global_batch,
                "progress": shares}

    def state():
        # "epoch" keeps its meaning, the last finished epoch: absent inside the first one
        out = _state(run, epoch - 1, max_accuracy, rng, rng_all, tracking, global_step, last_log)
        if epoch == 0:
            del out["epoch"], out["sampler_epoch"]
        out["recovery"] = recovery
        return out

    _write(run, (RECOVERY_NAME,), state, "Training stopped so that no recovery point goes unsaved.")
    return os.path.join(run.cfg.output.output_dir, RECOVERY_NAME)


def drop_recovery(run):
    """Remove recovery.pth once an epoch checkpoint stands later (rank 0). A kill before the removal leaves it
    behind, older than checkpoint.pth: the resume then takes checkpoint.pth (spach.train.resume.newest_state)."""
    if not run.dist.is_main:
        return
    path = os.path.join(run.cfg.output.output_dir, RECOVERY_NAME)
    try:
        if os.path.lexists(path):
            os.remove(path)
    except OSError as e:
        logger.warning(f"could not remove {path} ({e.strerror}); the newer {CHECKPOINT_NAME} is resumed all the same")
