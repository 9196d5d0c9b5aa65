"""Checks before a training checkpoint is resumed: it continues *this* run, and its fields are well-formed.

Resuming continues a run: its weights, optimizer state and epoch count only mean something for the same
classes in the same order, the same architecture at the same input size and the same optimizer. A
checkpoint of another run (a rerun with ``--data-path`` on another dataset, a changed ``--model``) is
refused with one line that says what differs and how to start from its weights instead (``--finetune``).
Flags that a user may change on a resume (``--epochs``, ``--lr``, ``--batch-size``, the augmentation, the
number of processes ...) are not compared.

The checkpoint is untrusted input: every field the resume reads is type- and range-checked first, so a
malformed field is one line naming it, never a traceback from deep inside ``load_state_dict``.
"""
import contextlib
import json
import logging
import math
import os
import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..errors import CheckpointError
from ..runtime.device import DistInfo
from ..files import open_own
from .checkpoint import CHECKPOINT_NAME, RECOVERY_NAME, atomic_write, open_checkpoint, position, set_rng_state
from .config import RESUME_IDENTITY, RunConfig
from .engine import EpochProgress

__all__ = ["Resumed", "continue_from", "resume", "check_eval_classes", "check_same_run", "check_resume_fields", "with_current_kernels",
           "sync_log", "newest_state", "stored_layout"]

logger = logging.getLogger("spach.train")


@dataclass
class Resumed:
    start_epoch: int = 0
    max_accuracy: float = 0.0
    last_good: str = ""  # the checkpoint a failed run would restart from ("" before the first save)
    tracking: dict = dataclasses.field(default_factory=dict)  # tracker name -> run id (W&B, MLflow) to continue
    steps_done: int = 0  # optimizer steps before the resumed point: the trackers' step axis carries on
    start_step: int = 0  # a mid-epoch resume: the optimizer steps of start_epoch already done
    start_samples: int = 0  # ... and the samples of the epoch's global sequence they consumed
    progress: Optional[EpochProgress] = None  # ... and this rank's share of that epoch's stats so far
    last_log: Optional[dict] = None  # the log.txt line of the last finished epoch (a later recovery carries it)


def _flag_name(dotted: str) -> str:
    return "--" + dotted.split(".")[1].replace("_", "-")


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"{len(names)} classes: {shown}"


def _differences(ckpt: dict, cfg: RunConfig, class_names: Sequence[str]) -> List[str]:
    diffs = []
    stored = ckpt.get("class_names")
    if isinstance(stored, (list, tuple)) and list(stored) != list(class_names):
        if sorted(stored) == sorted(class_names):
            diffs.append("the same class names in another order")
        else:
            diffs.append(f"other classes (checkpoint {_names(list(stored))}; this run's data {_names(list(class_names))})")
    stored_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    for dotted in RESUME_IDENTITY:
        key = dotted.split(".")[1]
        if key not in stored_args:
            continue
        before, now = stored_args[key], cfg.get(dotted)
        if before in (None, False) and now in (None, False):
            continue
        if before != now:
            diffs.append(f"{_flag_name(dotted)} {before} in the checkpoint, {now} now")
    return diffs


def check_same_run(ckpt: dict, path: str, cfg: RunConfig, class_names: Sequence[str], auto: bool):
    """Refuse to resume ``ckpt`` (read from ``path``) unless it continues the run ``cfg`` and the data describe:
    the same classes and the same :data:`RESUME_IDENTITY` fields; ``auto``: it was found in --output_dir rather
    than named by --resume."""
    diffs = _differences(ckpt, cfg, class_names)
    if not diffs:
        return
    what = "; ".join(diffs)
    kept = ", ".join(_flag_name(d) for d in RESUME_IDENTITY)
    if auto:
        raise CheckpointError(
            f"{path} belongs to another run ({what}; a resume keeps the classes and {kept}), so this command cannot "
            f"resume it: pass another --output_dir for a new run (add --finetune {path} to start from its weights), "
            f"or rerun with that run's flags and data to continue it")
    raise CheckpointError(
        f"--resume {path} is a checkpoint of another run ({what}; a resume keeps the classes and {kept}): to start "
        f"from its weights, pass --finetune {path} instead of --resume (a classifier head that does not fit is "
        f"re-initialised)")


def check_eval_classes(weights, class_names: Sequence[str]):
    """Refuse to evaluate weights whose recorded class names are not the data's, in the data's order: the
    accuracy would count matches between unrelated label indices (a renamed class folder shifts every label
    after it). Weights that record no names (official releases) are evaluated by index."""
    from ..data.folder import class_difference
    stored = weights.facts.get("class_names")
    if stored is None or list(stored) == list(class_names):
        return
    what = class_difference(list(stored), list(class_names), "the checkpoint", "the data")
    raise CheckpointError(f"{weights.source} was trained on other classes than this data's val/ split has ({what}; "
                          f"checkpoint {_names(list(stored))}; data {_names(list(class_names))}): evaluate it on data "
                          f"with the same class folders")


def _bad(path, field, detail) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} has a malformed '{field}' entry ({detail}): the file is damaged or "
                           f"was not written by spach; resume from another checkpoint, or start from its weights "
                           f"with --finetune")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_rng(state, path, field):
    if not isinstance(state, dict):
        raise _bad(path, field, f"a {type(state).__name__}, not a dict")
    t = state.get("torch")
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1):
        raise _bad(path, field, "no torch generator state")
    n = state.get("numpy")
    if not (isinstance(n, dict) and isinstance(n.get("keys"), torch.Tensor) and n["keys"].numel() == 624
            and _is_int(n.get("pos")) and 0 <= n["pos"] <= 624 and _is_int(n.get("has_gauss"))
            and isinstance(n.get("cached_gaussian"), (int, float))):
        raise _bad(path, field, "no valid numpy generator state")
    p = state.get("python")
    if not (isinstance(p, (list, tuple)) and len(p) == 3 and isinstance(p[1], (list, tuple)) and len(p[1]) == 625
            and all(_is_int(x) and 0 <= x < 2 ** 32 for x in p[1])):
        raise _bad(path, field, "no valid python generator state")


def check_resume_fields(ckpt: dict, path: str, world: int):
    """Type and range of every field a resume reads (``epoch``, ``max_accuracy``, ``optimizer``,
    ``model_ema``, ``scaler``, ``rng`` / ``rng_per_rank``, ``class_names``, ``log_stats``, ``args``)."""
    from ..models.pretrained import stored_facts
    if "args" in ckpt and not isinstance(ckpt["args"], dict):
        raise _bad(path, "args", f"a {type(ckpt['args']).__name__}, not a dict")
    stored_facts(ckpt.get("args") or {}, path)
    stored_facts({"class_names": ckpt.get("class_names"), "epoch": ckpt.get("epoch")}, path)
    if "epoch" in ckpt and not _is_int(ckpt["epoch"]):
        raise _bad(path, "epoch", f"{ckpt['epoch']!r:.40}")
    acc = ckpt.get("max_accuracy", 0.0)
    if not (isinstance(acc, (int, float)) and not isinstance(acc, bool) and math.isfinite(acc) and 0 <= acc <= 100):
        raise _bad(path, "max_accuracy", f"{acc!r:.40}, not a percentage")
    opt = ckpt.get("optimizer")
    if opt is not None:
        if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
                and isinstance(opt.get("param_groups"), list)
                and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"])):
            raise _bad(path, "optimizer", "not an optimizer state_dict with 'state' and 'param_groups'")
    for field in ("model_ema", "scaler"):
        value = ckpt.get(field)
        if value is not None and not isinstance(value, dict):
            raise _bad(path, field, f"a {type(value).__name__}, not a dict")
    if ckpt.get("log_stats") is not None and not isinstance(ckpt["log_stats"], dict):
        raise _bad(path, "log_stats", f"a {type(ckpt['log_stats']).__name__}, not a dict")
    per_rank = ckpt.get("rng_per_rank")
    if per_rank is not None:
        if not isinstance(per_rank, (list, tuple)):
            raise _bad(path, "rng_per_rank", f"a {type(per_rank).__name__}, not a list")
        if len(per_rank) == world:
            for state in per_rank:
                _check_rng(state, path, "rng_per_rank")
    if "rng" in ckpt and world == 1:
        _check_rng(ckpt["rng"], path, "rng")


def continue_from(cfg: RunConfig, owned: bool):
    """The checkpoint this run continues, decided once: ``(path, auto)``. ``auto``: it is --output_dir's own
    checkpoint.pth (auto-resume), looked for only in a folder this run owned from its start (one created since is
    another run's, which the lock then refuses). An explicit --resume names what the user wants; when the folder
    holds another run state of its own, continuing either would overwrite the other, so the conflict is refused
    in one line naming both files."""
    out = cfg.output
    auto = newest_state(out.output_dir) if owned and out.auto_resume else ""
    has_auto = bool(auto) and os.path.isfile(auto)
    if out.resume and has_auto:
        try:
            same = os.path.samefile(out.resume, auto)
        except OSError:
            same = False
        if not same:
            raise CheckpointError(
                f"--resume {out.resume} and {auto} (this folder's own checkpoint) are two runs to continue: drop "
                f"--resume to continue {auto}, pass another --output_dir to continue {out.resume} there, or add "
                f"--no-auto-resume to continue {out.resume} here, replacing {auto}")
        return auto, True
    if has_auto:
        return auto, True
    return out.resume, False


def _peek_position(path: str):
    """``(epoch, step)`` of a checkpoint in the output folder, read without loading its tensors; None when the
    file is absent or unreadable (the other one is then taken)."""
    if not os.path.isfile(path):
        return None
    try:
        from ..weights import open_weights
        contents = open_weights(path, mapped=True).contents
        if not (isinstance(contents, dict) and "model" in contents):
            return None
        rec = contents.get("recovery")
        if rec is not None and not (isinstance(rec, dict) and _is_int(rec.get("epoch")) and _is_int(rec.get("step"))):
            logger.warning(f"{path} has a malformed 'recovery' entry (no epoch and step): not resuming from it")
            return None
        return position(contents)
    except (CheckpointError, OSError, RuntimeError) as e:
        logger.warning(f"{path} does not read ({str(e).splitlines()[0][:160]}): not resuming from it")
        return None


def newest_state(folder: str) -> str:
    """The newest complete state of a run folder: its epoch checkpoint or its recovery checkpoint, whichever
    stands later in the run (a recovery checkpoint older than the epoch checkpoint is what a kill between that
    checkpoint's commit and the recovery file's removal leaves). The epoch checkpoint's path when neither exists."""
    epoch_ckpt, recovery = os.path.join(folder, CHECKPOINT_NAME), os.path.join(folder, RECOVERY_NAME)
    if not os.path.lexists(recovery):
        return epoch_ckpt
    at_recovery = _peek_position(recovery)
    at_epoch = _peek_position(epoch_ckpt)
    if at_recovery is not None and (at_epoch is None or at_recovery > at_epoch):
        return recovery
    return epoch_ckpt


def resume(cfg: RunConfig, step, dist: DistInfo, owned: bool, class_names) -> Resumed:
    """The checkpoint of :func:`continue_from`: weights, optimizer, EMA, scaler, best accuracy and each rank's RNG
    state. The checkpoint must continue this run (:func:`check_same_run`) and its fields are checked before use
    (:func:`check_resume_fields`)."""
    out = Resumed(start_epoch=cfg.output.start_epoch)
    path, auto = continue_from(cfg, owned)
    if auto:
        logger.info(f"auto resume from {path}")
    out.last_good = path if path and os.path.isfile(path) else ""
    if not path:
        return out
    weights = open_checkpoint(path)
    ckpt = weights.contents
    check_same_run(ckpt, path, cfg, class_names, auto=auto)
    from ..models import load_pretrained
    load_pretrained(step.model, weights)
    check_resume_fields(ckpt, path, dist.world_size)
    if "optimizer" in ckpt and ("epoch" in ckpt or isinstance(ckpt.get("recovery"), dict)):
        _check_layout(ckpt, path, cfg, dist)
        _restore_training_state(ckpt, path, step, dist, out)
        if isinstance(ckpt.get("recovery"), dict):
            _restore_position(ckpt, path, cfg, dist, out)
        if auto and dist.is_main:
            # (a recovery checkpoint carries the line of the last finished epoch)
            sync_log(os.path.join(cfg.output.output_dir, "log.txt"), out.start_epoch - 1, ckpt.get("log_stats"))
    del ckpt, weights
    return out


def _restore_training_state(ckpt: dict, path: str, step, dist: DistInfo, out: Resumed):
    with _field(path, "optimizer"):
        step.optimizer.load_state_dict(with_current_kernels(ckpt["optimizer"], step.optimizer))
    out.start_epoch = int(ckpt.get("epoch", -1)) + 1
    if step.ema is not None:
        if isinstance(ckpt.get("model_ema"), dict):
            with _field(path, "model_ema"):
                step.ema.module.load_state_dict(ckpt["model_ema"])
        else:  # the run did not keep an EMA until now: it starts from the resumed weights, not the initial ones
            step.ema.module.load_state_dict(step.model.state_dict())
            logger.info(f"{path} holds no EMA weights: the EMA starts from its weights")
    if step.scaler is not None and isinstance(ckpt.get("scaler"), dict) and ckpt["scaler"]:
        with _field(path, "scaler"):
            step.scaler.load_state_dict(ckpt["scaler"])
    out.max_accuracy = float(ckpt.get("max_accuracy", 0.0))
    out.last_log = ckpt.get("log_stats")
    tracking = ckpt.get("tracking")
    if isinstance(tracking, dict):
        out.tracking = {str(k): v for k, v in tracking.items() if isinstance(v, str) and v}
    global_step = ckpt.get("global_step")
    out.steps_done = global_step if isinstance(global_step, int) and global_step > 0 else 0
    per_rank = ckpt.get("rng_per_rank")
    with _field(path, "rng"):
        if per_rank and len(per_rank) == dist.world_size:
            set_rng_state(per_rank[dist.rank])
        elif "rng" in ckpt and dist.world_size == 1:
            set_rng_state(ckpt["rng"])
    logger.info(f"resumed {path} at epoch {out.start_epoch} (max accuracy so far {out.max_accuracy:.2f}%)")


def stored_layout(ckpt: dict):
    """``(global batch, processes, batch per process, accumulation)`` a checkpoint was trained at; a checkpoint
    written before accumulation existed (or by the original code) has no accumulation and its process count in
    ``world_size`` (the original's ``args.world_size``)."""
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    layout = ckpt.get("layout")
    if isinstance(layout, dict) and all(_is_int(layout.get(k)) and layout[k] > 0
                                        for k in ("global_batch", "world_size", "batch_size", "grad_accum_steps")):
        return layout["global_batch"], layout["world_size"], layout["batch_size"], layout["grad_accum_steps"]
    world = ckpt.get("world_size", args.get("world_size", 1))
    batch = args.get("batch_size")
    if not (_is_int(world) and world > 0 and _is_int(batch) and batch > 0):
        return None
    return batch * world, world, batch, 1


def _describe(batch, world, accum) -> str:
    return f"{batch} per process" + (f" x {accum} accumulation" if accum > 1 else "") + f" x {world} process(es)"


def _check_layout(ckpt: dict, path: str, cfg: RunConfig, dist: DistInfo):
    """The same global batch, however it is made up now; a changed one only when asked (--allow-batch-change)."""
    stored = stored_layout(ckpt)
    if stored is None:
        return
    g_then, world, batch, accum = stored
    o = cfg.optim
    then, now = _describe(batch, world, accum), _describe(o.batch_size, dist.world_size, o.grad_accum_steps)
    if g_then != o.global_batch:
        if not cfg.output.allow_batch_change:
            raise CheckpointError(
                f"{path} was trained at a global batch of {g_then} ({then}); this run's is {o.global_batch} ({now}): "
                f"keep {g_then} (e.g. --global-batch {g_then}) to continue the same run, or add --allow-batch-change "
                f"to change it deliberately (the lr is scaled to the new global batch)")
        logger.warning(f"the global batch changes from {g_then} ({then}) to {o.global_batch} ({now}) "
                       f"(--allow-batch-change); the lr becomes {o.effective_lr:g}")
    elif then != now:
        logger.info(f"resuming on another layout: global batch {g_then} = {now} (was {then})")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid_progress(p: EpochProgress) -> bool:
    return (_is_int(p.steps_done) and p.steps_done >= 0 and _number(p.loss_sum) and isinstance(p.lrs, list)
            and len(p.lrs) <= p.steps_done and all(_number(x) and x >= 0 for x in p.lrs) and _is_int(p.bad_images)
            and p.bad_images >= 0 and _number(p.elapsed) and p.elapsed >= 0)


def _restore_position(ckpt: dict, path: str, cfg: RunConfig, dist: DistInfo, out: Resumed):
    """A recovery checkpoint: the epoch and step to continue at, the samples of the epoch already consumed and
    this rank's share of the epoch's stats (its own when the process count is unchanged, else the ranks' shares
    merged: losses as a mean over the old ranks, unreadable images on the first rank)."""
    rec = ckpt["recovery"]
    epoch, steps, samples = rec.get("epoch"), rec.get("step"), rec.get("samples")
    shares = rec.get("progress")
    if not (_is_int(epoch) and epoch >= 0 and _is_int(steps) and steps >= 0 and _is_int(samples) and samples >= 0
            and isinstance(shares, list) and shares and all(isinstance(p, dict) for p in shares)):
        raise _bad(path, "recovery", "not an epoch, step, samples and progress")
    try:
        shares = [EpochProgress(**p) for p in shares]
    except TypeError:
        raise _bad(path, "recovery", "a progress entry with unknown fields") from None
    for p in shares:
        if not _valid_progress(p):
            raise _bad(path, "recovery", "a progress entry whose counts, loss sum, lrs or time are not numbers in "
                                         "range")
    g = cfg.optim.global_batch
    if samples % dist.world_size:
        raise CheckpointError(f"{path} stopped after {samples} samples of epoch {epoch}, which {dist.world_size} "
                              f"processes cannot share evenly: resume it on a number of processes that divides "
                              f"{samples}, or resume {os.path.join(os.path.dirname(path), CHECKPOINT_NAME)} (the "
                              f"epoch's start) with --resume and --no-auto-resume")
    workers, batch = (ckpt.get("args") or {}).get("num_workers"), (ckpt.get("args") or {}).get("batch_size")
    if cfg.data.data_set == "WDS" and (len(shares), workers, batch) != (dist.world_size, cfg.data.num_workers,
                                                                         cfg.optim.batch_size):
        raise CheckpointError(f"{path} stopped inside epoch {epoch} on {len(shares)} process(es) x {workers} loader "
                              f"worker(s) x batch {batch}; WebDataset shards are dealt out per process and worker, so "
                              f"the epoch can only be finished on the same: rerun with {len(shares)} processes, "
                              f"--num_workers {workers} and --batch-size {batch}, or restart the epoch with --resume "
                              f"{os.path.join(os.path.dirname(path), CHECKPOINT_NAME)} --no-auto-resume")
    if len(shares) == dist.world_size:
        mine = shares[dist.rank]
    else:
        mine = EpochProgress(shares[0].steps_done, sum(p.loss_sum for p in shares) / len(shares), shares[0].lrs,
                             sum(p.bad_images for p in shares) if dist.rank == 0 else 0,
                             max(p.elapsed for p in shares))
    mine.steps_done = samples // g  # the same step unless the global batch changed (--allow-batch-change)
    out.start_epoch, out.start_step, out.start_samples, out.progress = epoch, mine.steps_done, samples, mine
    logger.info(f"resumed {path} in epoch {epoch} after step {mine.steps_done} ({samples} samples of the epoch done)")


@contextlib.contextmanager
def _field(path: str, field: str):
    """A checkpoint field that passed the type checks but still does not load is one line naming it."""
    try:
        yield
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path}: its '{field}' entry does not load into this run ({detail}): "
                              f"the file is damaged or was written by another setup; resume from another "
                              f"checkpoint, or start from its weights with --finetune") from None


def with_current_kernels(saved: dict, optimizer) -> dict:
    """A saved optimizer state with this run's kernel choice (``fused`` / ``foreach`` / ``capturable``):
    ``load_state_dict`` would otherwise bring back the settings of the device that wrote it (foreach AdamW from a
    CPU run resumed on a GPU, or fused kernels on a device without them)."""
    saved_groups = saved.get("param_groups", [])
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(f"the checkpoint's optimizer state has {len(saved_groups)} parameter groups, this run's "
                              f"optimizer {len(optimizer.param_groups)}: it was written by another optimizer setup; "
                              f"start from its weights with --finetune instead of --resume")
    groups = []
    for saved_group, group in zip(saved_groups, optimizer.param_groups):
        saved_group = dict(saved_group)
        for key in ("fused", "foreach", "capturable"):
            if key in group:
                saved_group[key] = group[key]
        groups.append(saved_group)
    return dict(saved, param_groups=groups) if groups else saved


def sync_log(path: str, epoch: int, stats: Optional[dict]):
    """Make log.txt end with the line of the checkpoint's ``epoch``: a kill after the checkpoint was written but
    before its line was appended (or in the middle of appending it) would otherwise leave a gap."""
    lines = []
    if os.path.lexists(path):
        fd = open_own(path, os.O_RDONLY, what="log file")
        with os.fdopen(fd, "rb") as f:
            lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            line = line.decode("utf-8")
            row = json.loads(line)
        except ValueError:  # a line torn by a kill, or bytes that are not a line spach wrote (not UTF-8)
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= epoch:
            kept.append(line)
    if stats and not any(json.loads(line)["epoch"] == epoch for line in kept):
        kept.append(json.dumps(stats))
    if len(kept) != len(lines) or any(k.encode("utf-8") != line for k, line in zip(kept, lines)):
        text = "".join(line + "\n" for line in kept).encode("utf-8")
        atomic_write(path, lambda f: f.write(text), what="log file")
