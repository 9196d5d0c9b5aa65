"""Average the weights of the best epoch checkpoints of a run (timm's avg_checkpoints.py).

Reads the checkpoint-<epoch>.pth files that `spach train --checkpoint-hist K` keeps in an output folder, ranks them
by their epoch's top-1 (log.txt's test_acc1, stored in each file; a timm checkpoint's 'metric'), and writes the mean
of the N best: floating-point tensors averaged in float64 and cast back, integer buffers (BatchNorm's
num_batches_tracked) taken from the best. The files must be one model (same tensors, model name and classes). The
result is a checkpoint with 'model', the best file's 'args' and 'class_names', and 'averaged_from' (the files, their
epochs and top-1), which `spach eval --checkpoint`, `spach export`, `spach predict` and --finetune take.

examples:
  spach train --data-path /data/imagenet --model spach_ms_s_patch4_224_conv --checkpoint-hist 5
  spach average --input output/spach_ms_s_patch4_224_conv-imagenet
  spach eval --checkpoint output/spach_ms_s_patch4_224_conv-imagenet/averaged.pth --data-path /data/imagenet
"""
import glob
import math
import os

import torch

from ..errors import SpachError
from ..files import folder_write_problem, path_kind
from ..train.checkpoint import atomic_save
from ..train.history import HISTORY_PATTERN
from ..weights import open_weights, strip_prefixes
from ._help import use_help_formatter

DEFAULT_OUTPUT = "averaged.pth"


def add_arguments(parser):
    use_help_formatter(parser)
    parser.add_argument("--input", required=True, metavar="DIR", help="the output folder holding the checkpoints")
    parser.add_argument("--filter", default=HISTORY_PATTERN, metavar="GLOB",
                        help="which files of DIR to average (a glob)")
    parser.add_argument("-n", "--n", dest="n", type=int, default=None, metavar="N",
                        help="average the N best (with --no-sort: the first N by name); default: all found")
    parser.add_argument("--use-ema", dest="use_ema", action="store_true", default=None,
                        help="average the EMA weights (model_ema); every file must have them (default: the EMA "
                             "weights when every file has them, as timm, else the model's)")
    parser.add_argument("--no-use-ema", dest="use_ema", action="store_false",
                        help="average the model's own weights%(default).0s")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help=f"the checkpoint to write (default: DIR/{DEFAULT_OUTPUT}); for .safetensors run "
                             f"`spach export --format safetensors` on it")
    parser.add_argument("--no-sort", dest="sort", action="store_false",
                        help="take the files in name order instead of best top-1 first%(default).0s")


def _metric(weights):
    """A file's top-1 as stored (spach: log_stats.test_acc1; timm: 'metric'); None if it states none. Untrusted:
    anything but a finite number counts as none."""
    contents = weights.contents if isinstance(weights.contents, dict) else {}
    stats = contents.get("log_stats")
    value = stats.get("test_acc1") if isinstance(stats, dict) else contents.get("metric")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _epoch(weights):
    return weights.facts.get("epoch")


def _choose(args, files):
    """The opened files to average, best first (or in name order with --no-sort), and their metrics."""
    opened = [open_weights(f) for f in files]
    if not args.sort:
        chosen = opened[:args.n] if args.n else opened
        return chosen, [_metric(w) for w in chosen]
    ranked = [(w, _metric(w)) for w in opened]
    unranked = [w for w, m in ranked if m is None]
    ranked = [(w, m) for w, m in ranked if m is not None]
    if not ranked:
        raise SpachError(f"none of the {len(files)} files matching {args.filter} in {args.input} records a top-1 "
                         f"(log_stats.test_acc1 or metric) to rank by: pass --no-sort to average them in name order")
    if unranked:
        print(f"note: left out {len(unranked)} file(s) that record no top-1 to rank by: "
              f"{', '.join(os.path.basename(w.source) for w in unranked[:5])}")
    # best first; ties: the earlier epoch first, as the history ranks them
    ranked.sort(key=lambda wm: (-wm[1], _epoch(wm[0]) if _epoch(wm[0]) is not None else 0, wm[0].source))
    ranked = ranked[:args.n] if args.n else ranked
    return [w for w, _ in ranked], [m for _, m in ranked]


def _same_model(best, best_sd, other, sd):
    """One line naming ``other`` and what differs from ``best``, or ''."""
    name = os.path.basename(other.source)
    for fact in ("model", "class_names"):
        a, b = best.facts.get(fact), other.facts.get(fact)
        if a != b:
            def shown(v):
                return f"{len(v)} classes" if fact == "class_names" and v is not None and len(v) > 5 else repr(v)
            return (f"{other.source} is not the same model as {best.source}: its {fact} is {shown(b)}, not "
                    f"{shown(a)}; average checkpoints of one run (narrow --filter, or move {name} out)")
    if sd.keys() != best_sd.keys():
        diff = sorted(set(sd) ^ set(best_sd))
        return (f"{other.source} is not the same model as {best.source}: {len(diff)} tensor(s) differ by name (e.g. "
                f"{diff[0]}); average checkpoints of one run (narrow --filter, or move {name} out)")
    for k, v in sd.items():
        if v.shape != best_sd[k].shape or v.dtype != best_sd[k].dtype:
            return (f"{other.source} is not the same model as {best.source}: tensor {k} is {tuple(v.shape)} "
                    f"{v.dtype}, not {tuple(best_sd[k].shape)} {best_sd[k].dtype}; average checkpoints of one run")
    return ""


def average_state_dicts(state_dicts):
    """The mean of ``state_dicts`` (same keys, shapes, dtypes): floating-point tensors summed in float64, divided,
    cast back to their dtype; others (integer buffers such as num_batches_tracked) from the first."""
    first = state_dicts[0]
    out = {}
    for k, v in first.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        total = torch.zeros(v.shape, dtype=torch.float64)
        for sd in state_dicts:
            total += sd[k].to(torch.float64)
        out[k] = (total / len(state_dicts)).to(v.dtype)
    return out


def _output(args) -> str:
    output = args.output or os.path.join(args.input, DEFAULT_OUTPUT)
    if output.endswith(".safetensors"):
        raise SpachError(f"--output {output}: spach average writes a .pth checkpoint; write it, then run spach export "
                         f"--checkpoint FILE.pth --format safetensors --output {output}")
    if os.path.islink(output):
        raise SpachError(f"--output {output} is a symbolic link: spach writes its files only where it made them; "
                         f"remove the link or pass another --output")
    kind = path_kind(output)
    if kind not in ("missing", "regular file"):
        raise SpachError(f"--output {output} is a {kind}: pass the path of a file to write")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise SpachError(f"cannot write {output}: folder {parent} does not exist")
    problem = folder_write_problem(parent)
    if problem:
        raise SpachError(f"cannot write {output}: folder {parent} {problem}; pass an --output in a writable folder")
    return output


def run(args) -> int:
    kind = path_kind(args.input)
    if kind != "folder":
        what = "does not exist" if kind == "missing" else f"is a {kind}"
        raise SpachError(f"--input {args.input} {what}: pass a training output folder (--output_dir)")
    if args.n is not None and args.n < 1:
        raise SpachError(f"-n {args.n}: pass a number of checkpoints of at least 1")
    output = _output(args)
    files = sorted(f for f in glob.glob(os.path.join(glob.escape(args.input), args.filter)))
    if not files:
        raise SpachError(f"no file in {args.input} matches {args.filter}: train with --checkpoint-hist K to keep the "
                         f"K best epoch checkpoints there, or pass another --filter")
    if os.path.exists(output):
        for f in files:
            if os.path.samefile(f, output):
                raise SpachError(f"--output {output} is one of the checkpoints to average ({f}): pass another "
                                 f"--output (or a --filter that leaves it out)")
    chosen, metrics = _choose(args, files)
    use_ema = args.use_ema
    if use_ema is None:  # timm's default: the EMA weights where there are some
        use_ema = all(isinstance(w.contents, dict) and isinstance(w.contents.get("model_ema"), dict) for w in chosen)
    best = chosen[0]
    best_sd = strip_prefixes(best.state_dict(use_ema))
    state_dicts = [best_sd]
    for w in chosen[1:]:
        sd = strip_prefixes(w.state_dict(use_ema))
        problem = _same_model(best, best_sd, w, sd)
        if problem:
            raise SpachError(problem)
        state_dicts.append(sd)
    averaged = average_state_dicts(state_dicts)
    contents = best.contents if isinstance(best.contents, dict) else {}
    checkpoint = {
        "model": averaged,
        "args": contents.get("args") if isinstance(contents.get("args"), dict) else None,
        "class_names": best.facts.get("class_names"),
        # what the mean is of: the files (names, as they were in the folder), their epochs and top-1
        "averaged_from": [{"file": os.path.basename(w.source), "epoch": _epoch(w), "test_acc1": m}
                          for w, m in zip(chosen, metrics)],
        "averaged_ema": use_ema,
    }
    atomic_save(checkpoint, output)
    which = "EMA weights" if use_ema else "weights"
    shown = ", ".join(f"{os.path.basename(w.source)}" + (f" ({m:.2f}%)" if m is not None else "")
                      for w, m in zip(chosen, metrics))
    print(f"averaged the {which} of {len(chosen)} checkpoint(s): {shown}")
    print(f"wrote {output}")
    return 0
