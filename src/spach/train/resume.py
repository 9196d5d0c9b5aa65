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
import math
from typing import List, Sequence

import torch

from ..errors import CheckpointError

__all__ = ["IDENTITY_FLAGS", "check_same_run", "check_resume_fields"]

# the flags a checkpoint's weights and optimizer state depend on (beyond the class names): the model and
# its shape options, the input size (position-dependent weights, fixed-size token MLPs) and the optimizer kind
IDENTITY_FLAGS = ("model", "input_size", "stem_type", "shared_spatial_func", "norm_layer", "act_layer", "opt")


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"{len(names)} classes: {shown}"


def _differences(ckpt: dict, args, class_names: Sequence[str]) -> List[str]:
    diffs = []
    stored = ckpt.get("class_names")
    if isinstance(stored, (list, tuple)) and list(stored) != list(class_names):
        if sorted(stored) == sorted(class_names):
            diffs.append("the same class names in another order")
        else:
            diffs.append(f"other classes (checkpoint {_names(list(stored))}; this run's data {_names(list(class_names))})")
    stored_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    for flag in IDENTITY_FLAGS:
        if flag not in stored_args:
            continue
        before, now = stored_args[flag], getattr(args, flag, None)
        if before in (None, False) and now in (None, False):
            continue
        if before != now:
            diffs.append(f"--{flag.replace('_', '-')} {before} in the checkpoint, {now} now")
    return diffs


def check_same_run(ckpt: dict, path: str, args, class_names: Sequence[str], auto: bool):
    """Refuse to resume ``ckpt`` (read from ``path``) unless it continues the run these ``args`` and data
    describe; ``auto``: it was found in --output_dir rather than named by --resume."""
    diffs = _differences(ckpt, args, class_names)
    if not diffs:
        return
    what = "; ".join(diffs)
    if auto:
        raise CheckpointError(
            f"{path} belongs to another run ({what}), so this command cannot resume it: pass another --output_dir "
            f"for a new run (add --finetune {path} to start from its weights), or rerun with that run's flags "
            f"and data to continue it")
    raise CheckpointError(
        f"--resume {path} is a checkpoint of another run ({what}): to start from its weights, pass --finetune "
        f"{path} instead of --resume (a classifier head that does not fit is re-initialised)")


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
