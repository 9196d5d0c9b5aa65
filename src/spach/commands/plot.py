"""Plot training curves from `spach train` output folders: train loss, val top-1, val top-5 and learning
rate per epoch, read from each folder's log.txt (one JSON object per epoch). Several runs share one figure,
labelled by folder name. Writes a PNG (headless; needs matplotlib: pip install 'spach[plot]'), prints a
one-line summary per run, and with --tensorboard also writes the curves as TensorBoard scalars.

examples:
  spach plot output/run1 output/run2 --output curves.png
  spach plot output/run1 --tensorboard tb_runs && tensorboard --logdir tb_runs
"""
import json
import math
import os
from typing import Dict, List

from ..errors import DataError, SpachError
from ._help import use_help_formatter

LOG_NAME = "log.txt"
PLOT_INSTALL = "spach plot needs matplotlib: pip install 'spach[plot]'"

# (key in log.txt, panel title, y label)
PANELS = (
    ("train_loss", "train loss", "loss"),
    ("test_acc1", "val top-1", "accuracy (%)"),
    ("test_acc5", "val top-5", "accuracy (%)"),
    ("train_lr", "learning rate", "lr"),
)
# a second curve drawn in a panel: (key, line style, what the title says about it)
COMPANIONS = {
    "train_loss": ("test_loss", "--", "val dashed"),
    "test_acc1": ("test_ema_acc1", ":", "EMA dotted"),
    "test_acc5": ("test_ema_acc5", ":", "EMA dotted"),
}


def add_arguments(parser):
    use_help_formatter(parser)
    parser.add_argument("runs", nargs="+", metavar="OUTPUT_DIR",
                        help="output folders of `spach train` (each with a log.txt), or log.txt files")
    parser.add_argument("--output", default="plot.png", metavar="FILE", help="PNG to write")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="also write each run's curves as TensorBoard scalars under DIR/<run name> "
                             "(needs tensorboard: pip install 'spach[tensorboard]')")


def log_path(run: str) -> str:
    """The log.txt of an output folder (or ``run`` itself when it is a file)."""
    if os.path.isfile(run):
        return run
    if not os.path.exists(run):
        raise DataError(f"output folder {run} does not exist: pass the --output_dir of a `spach train` run")
    if not os.path.isdir(run):
        from ..files import path_kind
        raise DataError(f"{run} is a {path_kind(run)}: pass the --output_dir of a `spach train` run or its log.txt")
    path = os.path.join(run, LOG_NAME)
    if not os.path.isfile(path):
        raise DataError(f"{run} has no {LOG_NAME}: pass the --output_dir of a `spach train` run that finished "
                        f"at least one epoch")
    return path


def read_log(path: str) -> List[dict]:
    """The epochs of a DeiT-style ``log.txt``: one JSON object per line, sorted by ``epoch`` (the line number
    when absent; a resumed run's repeated epochs keep the last entry). A torn last line (a run still
    writing or killed mid-write) is skipped; other undecodable lines are skipped with a warning."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    numbered = [(i, line.strip()) for i, line in enumerate(lines) if line.strip()]
    by_epoch: Dict[int, dict] = {}
    bad = []
    for n, (i, line) in enumerate(numbered):
        try:
            entry = json.loads(line)
        except ValueError:
            if n != len(numbered) - 1:
                bad.append(i + 1)
            continue
        if not isinstance(entry, dict):
            bad.append(i + 1)
            continue
        epoch = entry.get("epoch", len(by_epoch))
        if not _is_epoch(epoch):  # NaN, 1e400 (inf), -3, 2.5, "x": not an epoch a run wrote
            bad.append(i + 1)
            continue
        epoch = int(epoch)
        by_epoch[epoch] = dict(entry, epoch=epoch)
    if bad:
        from ..inference import warn
        warn(f"{path}: skipped {len(bad)} line(s) that are not JSON objects with a valid epoch (line {', '.join(map(str, bad[:5]))})")
    if not by_epoch:
        raise DataError(f"{path} has no epochs yet (no JSON lines): wait for the first epoch of training to end")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _is_epoch(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value == int(value) and 0 <= value < 10 ** 7)


def run_labels(runs: List[str]) -> List[str]:
    """Short unique labels: the folder name, with parent folders added while two runs share a name."""
    parts = []
    for run in runs:
        path = os.path.abspath(run)
        if os.path.basename(path) == LOG_NAME:
            path = os.path.dirname(path)
        parts.append([p for p in path.split(os.sep) if p])
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) or run for p, run in zip(parts, runs)]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1


def _series(entries: List[dict], key: str):
    xs, ys = [], []
    for e in entries:
        v = e.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(e["epoch"])
            ys.append(float(v))
    return xs, ys


def plot_runs(runs: Dict[str, List[dict]], output: str, title: str = None) -> None:
    """Draw the four panels for every run into ``output`` (PNG, Agg backend: no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SpachError(PLOT_INSTALL) from None
    fig = Figure(figsize=(11, 8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, panel_title, ylabel) in zip(axes, PANELS):
        drawn = False
        for i, (label, entries) in enumerate(runs.items()):
            xs, ys = _series(entries, key)
            if xs:
                ax.plot(xs, ys, color=f"C{i % 10}", marker="o" if len(xs) < 20 else None, markersize=3, label=label)
                drawn = True
        if key in COMPANIONS:  # validation loss / EMA accuracy in the run's colour, where logged
            other, style, note = COMPANIONS[key]
            drawn_other = False
            for i, (label, entries) in enumerate(runs.items()):
                xs, ys = _series(entries, other)
                if xs:
                    ax.plot(xs, ys, linestyle=style, color=f"C{i % 10}", alpha=0.7)
                    drawn = drawn_other = True
            if drawn_other:
                panel_title = f"{panel_title} ({note})"
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if key == "train_lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {key} in log.txt", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(output, format="png")
    except OSError as e:
        raise SpachError(f"cannot write {output}: {type(e).__name__}: {e.strerror or e}") from None


def summary(label: str, entries: List[dict]) -> str:
    last = entries[-1]
    text = f"{label}: {len(entries)} epoch{'s' if len(entries) != 1 else ''} (last {last['epoch']})"
    if isinstance(last.get("train_loss"), (int, float)):
        text += f", train loss {last['train_loss']:.4f}"
    xs, ys = _series(entries, "test_acc1")
    if ys:
        best = max(range(len(ys)), key=ys.__getitem__)
        text += f", best val top-1 {ys[best]:.2f}% (epoch {xs[best]})"
    return text


def run(args) -> int:
    if args.tensorboard:
        from ..tb import require_tensorboard
        require_tensorboard()
    paths = [log_path(r) for r in args.runs]
    labels = run_labels(args.runs)
    runs = {label: read_log(path) for label, path in zip(labels, paths)}
    if not args.output.lower().endswith(".png"):
        raise SpachError(f"--output {args.output}: spach plot writes PNG files; name it *.png")
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent):
        raise SpachError(f"cannot write {args.output}: folder {parent} does not exist")
    plot_runs(runs, args.output, title=args.title)
    for label, entries in runs.items():
        print(summary(label, entries))
    print(f"wrote {args.output}")
    if args.tensorboard:
        from ..tb import TensorBoardWriter
        for label, entries in runs.items():
            log_dir = os.path.join(args.tensorboard, label)
            with TensorBoardWriter(log_dir) as writer:
                for entry in entries:
                    writer.write(entry, entry["epoch"])
            print(f"wrote TensorBoard scalars of {label} to {log_dir}")
        print(f"view them with: tensorboard --logdir {args.tensorboard}")
    return 0
