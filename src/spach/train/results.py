"""``spach eval --results-file F.csv|F.json``: one row per evaluated checkpoint, appended, so that a sweep of
``spach eval`` runs collects its results in one file (the columns of timm's ``validate.py``: ``model``,
``top1``, ``top1_err``, ``top5``, ``top5_err``, ``param_count``, ``img_size``, ``crop_pct``, ``interpolation``,
and the checkpoint, its EMA choice, the loss and the number of images)."""
import csv
import io
import json
import os

from timm.data import DEFAULT_CROP_PCT

from ..errors import SpachError
from ..files import open_own

__all__ = ["results_row", "append_results", "RESULTS_FORMATS"]

RESULTS_FORMATS = (".csv", ".json")


def results_row(cfg, stats: dict, n_parameters: int) -> dict:
    return {
        "model": cfg.model.model, "checkpoint": cfg.output.resume, "ema": cfg.output.eval_ema,
        "top1": round(stats["acc1"], 4), "top1_err": round(100 - stats["acc1"], 4),
        "top5": round(stats["acc5"], 4), "top5_err": round(100 - stats["acc5"], 4),
        "loss": round(stats["loss"], 6), "n_images": stats["n"], "param_count": round(n_parameters / 1e6, 3),
        "img_size": cfg.data.input_size, "crop_pct": cfg.aug.crop_pct or DEFAULT_CROP_PCT,
        "interpolation": "bicubic",  # the evaluation preset's (spach.data.transforms)
        "data_path": cfg.data.data_path, "amp": cfg.device.amp,
    }


def append_results(path: str, row: dict):
    """Append ``row``: a CSV line (the header first when the file is new or empty), or one more element of the
    JSON file's list (rewritten whole through a temporary file, so a reader never sees half of it)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        new = not os.path.isfile(path) or os.path.getsize(path) == 0
        if not new:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != list(row):
                raise SpachError(f"--results-file {path} has other columns ({', '.join(header[:4])} ...): "
                                 f"pass a new file")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
        with os.fdopen(open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what="results file"), "a") as f:
            f.write(buf.getvalue())  # one write: parallel evaluations appending to one file do not interleave
        return
    rows = []
    if os.path.isfile(path) and os.path.getsize(path):
        try:
            with open(path) as f:
                rows = json.load(f)
        except (ValueError, UnicodeDecodeError):
            rows = None
        if not isinstance(rows, list):
            raise SpachError(f"--results-file {path} is not a JSON list of results: pass a new file")
    rows.append(row)
    tmp = f"{path}.tmp{os.getpid()}"
    with os.fdopen(open_own(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, what="results file"), "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
