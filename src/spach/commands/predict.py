"""Classify images: the top-k classes of each, with probabilities, on the terminal or into a CSV / JSON file.

IMAGE may be a file, a folder (walked for image files, sub-folders too) or a quoted glob pattern
('imgs/**/*.png'). Images are read a few batches ahead of the model (in -j worker processes), so a folder of
any size runs in flat memory. Images go through the model's evaluation transform at the checkpoint's input
size (resize by crop_pct, bicubic, center crop, ImageNet mean/std). Class names come from the checkpoint
(`spach train` stores the dataset's folder names in it; `spach export --format safetensors` and `--format hf`
keep them); a 1000-class model without names gets the ImageNet-1k class descriptions; otherwise classes are
shown by index.

--output F.csv has the columns of timm's inference.py (--results-separate-col --include-index --fullname):
filename, index_0.., label_0.., prob_0..; --output F.json is a list of the records --json prints. F is
written beside itself under a temporary name and renamed when complete. Predictions are shown as a table,
beside --output for up to 20 images (more get a progress bar). An image that cannot be read is named in a
warning and skipped; the run then ends with an error that counts them (exit 2), after the others' predictions
are out (one image alone that cannot be read is the error itself).

examples:
  spach predict --checkpoint output/best.pth photo1.jpg photo2.png
  spach predict --checkpoint output/best.pth photos/ --output predictions.csv -j 4
  spach predict --checkpoint output/best.pth 'photos/**/*.jpg' --output predictions.json
  spach predict --model spach_ms_s_patch4_224_conv --checkpoint spach_ms_conv_s.pth cat.jpg --topk 3 --json
"""
import contextlib
import csv
import json
import os
import sys
import tempfile

import torch

from ..data.image_list import image_paths
from ..errors import DataError, SpachError
from ..files import os_error_reason, path_kind
from ..inference import build_model, predict_batches, warn
from ._help import use_help_formatter

TABLE_MAX = 20  # beside --output, a run of at most this many images is also shown as a table


def add_arguments(parser):
    use_help_formatter(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (anything Pillow reads), folders of them, or quoted glob patterns")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="model name (`spach models`); may be left out when the checkpoint names it")
    parser.add_argument("--checkpoint", default=None, metavar="CKPT",
                        help="weights: a training checkpoint, an official release .pth, a .safetensors file, a model "
                             "folder (spach export --format hf), an hf-hub:ORG/NAME id, or an http(s) URL")
    parser.add_argument("--topk", type=int, default=5, help="how many classes to give per image")
    parser.add_argument("--img-size", type=int, default=None, metavar="N",
                        help="input size (default: the checkpoint's training size, else the model's 224)")
    parser.add_argument("--crop-pct", type=float, default=None,
                        help="resize to size / crop_pct before the centre crop (default: the checkpoint's "
                             "training --crop-pct, else the model's 0.875)")
    parser.add_argument("--use-ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument("-b", "--batch-size", type=int, default=32, metavar="N", help="images per forward pass")
    parser.add_argument("-j", "--num-workers", "--num_workers", dest="num_workers", type=int, default=2,
                        metavar="N", help="processes decoding images ahead of the model (0: decode in this one)")
    parser.add_argument("--device", default=None,
                        help="cuda | npu | mps | cpu, optionally with an index (cuda:1); default: the best available")
    parser.add_argument("-o", "--output", default=None, metavar="FILE",
                        help="write the predictions to FILE.csv or FILE.json (the extension picks the format)")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")


def _device(name) -> torch.device:
    from ..runtime.device import resolve_device  # the one place that knows cuda / npu / mps / cpu
    kind = resolve_device(name)
    index = name.split(":", 1)[1] if name and ":" in name else None
    try:
        return torch.device(f"{kind}:{index}" if index else kind)
    except RuntimeError as e:
        raise SpachError(f"bad --device {name!r}: {e}") from None


# --- the output file ------------------------------------------------------------------------------------
def _output_problem(path: str) -> str:
    """'' when ``path`` can be written as the results file, else the one-line error."""
    kind = path_kind(path)
    if kind == "folder":
        return f"--output {path} is a folder: pass a file path, e.g. --output {os.path.join(path, 'predictions.csv')}"
    if kind not in ("missing", "regular file"):  # a broken link counts as missing: it is replaced, not followed
        return f"--output {path} is a {kind}: pass the path of a file to write"
    if os.path.splitext(path)[1].lower() not in (".csv", ".json"):
        return f"--output {path}: name a .csv or .json file (the extension picks the format)"
    parent = os.path.dirname(os.path.abspath(path))
    parent_kind = path_kind(parent)
    if parent_kind != "folder":
        what = "does not exist" if parent_kind == "missing" else f"is a {parent_kind}, not a folder"
        return (f"cannot write --output {path}: {parent} {what}; create the folder (mkdir -p {parent}) or pass "
                f"another path")
    return ""


class ResultsFile:
    """``--output``: rows go into a temporary file beside ``path``, renamed over it by :meth:`commit`, so a
    failed or interrupted run never leaves a partial file under its name (nor removes an older one). A link at
    ``path`` is replaced, not written through. The path is checked, and the temporary file made, on
    construction: before the model is built."""

    def __init__(self, path: str):
        problem = _output_problem(path)
        if problem:
            raise SpachError(problem)
        self.path, self.csv = path, path.lower().endswith(".csv")
        folder = os.path.dirname(os.path.abspath(path))
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
        except OSError as e:  # read-only file system, no write permission
            raise SpachError(f"cannot write --output {path}: {folder} {os_error_reason(e)}; pass a path in a folder "
                             f"you can write") from None
        self.file = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self.rows = 0

    def start(self, k: int):
        if self.csv:
            self.writer = csv.writer(self.file)
            self.writer.writerow(["filename"] + [f"{col}_{i}" for col in ("index", "label", "prob") for i in range(k)])
        else:
            self.file.write("[")

    def _failed(self, e: OSError) -> SpachError:
        """A write that failed midway (a full disk, a quota): one line; the partial file goes in __exit__."""
        return SpachError(f"cannot write --output {self.path}: {os.path.dirname(os.path.abspath(self.path))} "
                          f"{os_error_reason(e)}; no {os.path.basename(self.path)} was written (an older one is "
                          f"kept): free space or pass a path elsewhere")

    def add(self, records):
        try:
            self._add(records)
        except OSError as e:
            raise self._failed(e) from None

    def _add(self, records):
        for rec in records:
            if self.csv:
                preds = rec["predictions"]
                self.writer.writerow([rec["image"]] + [p["class_index"] for p in preds]
                                     + [p["class_name"] or "" for p in preds] + [p["probability"] for p in preds])
            else:
                self.file.write(("," if self.rows else "") + "\n" + json.dumps(rec))
            self.rows += 1

    def commit(self):
        try:
            if not self.csv:
                self.file.write("\n]\n")
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as e:
            raise self._failed(e) from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # as a plain open() would have made it, not mkstemp's 0600
        os.replace(self.tmp, self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.file.close()
        except OSError:  # its buffer could not be written (a full disk): the file is dropped below anyway
            pass
        if os.path.exists(self.tmp):  # not committed
            os.remove(self.tmp)


# --- the terminal ---------------------------------------------------------------------------------------
class JsonPrinter:
    """``--json``: the model's facts and its records, printed as they come (one JSON document in the end)."""

    def __init__(self, info):
        head = {"model": info.model_name, "checkpoint": info.checkpoint, "num_classes": info.num_classes,
                "img_size": list(info.img_size)}
        print(json.dumps(head, indent=2)[:-2] + ',\n  "results": [', end="")
        self.rows = 0

    def add(self, records):
        for rec in records:
            print(("," if self.rows else "") + "\n    " + json.dumps(rec), end="")
            self.rows += 1

    def close(self):
        print("\n  ]\n}")


def print_table(records):
    for rec in records:
        print(rec["image"])
        for p in rec["predictions"]:
            name = f"  {p['class_name']}" if p["class_name"] is not None else ""
            print(f"  {p['rank']:>2}. {100 * p['probability']:6.2f}%  class {p['class_index']:<4}{name}")


def _progress(total: int, shown: bool):
    """A progress bar on a terminal's stderr when the table does not show each image; otherwise none."""
    if shown:
        return contextlib.nullcontext(None)
    from tqdm import tqdm
    return tqdm(total=total, unit="img", desc="predicting", file=sys.stderr, disable=None, dynamic_ncols=True)


# --- the command ----------------------------------------------------------------------------------------
def _check_flags(args):
    for flag, value, least in (("--topk", args.topk, 1), ("--batch-size", args.batch_size, 1),
                               ("--num-workers", args.num_workers, 0)):
        if value < least:
            raise SpachError(f"{flag} must be at least {least} (got {value})")


def _stream(model, info, paths, args, device, sinks, bar) -> int:
    """Predict ``paths`` into every sink; the number of images that could not be read."""
    from tqdm import tqdm
    # worker processes take a second to start: not worth it for images that fit in one batch
    workers = args.num_workers if len(paths) > args.batch_size else 0
    unreadable = 0
    batches = predict_batches(model, info, paths, topk=args.topk, batch_size=args.batch_size, device=device,
                              num_workers=workers)
    try:
        for records, bad in batches:
            for _, why in bad:
                if len(paths) == 1:  # nothing else to go on with: the reason is the error, one line as ever
                    raise DataError(why)
                with tqdm.external_write_mode(file=sys.stderr):  # the warning above the bar, not through it
                    warn(f"{why}; skipped")
            unreadable += len(bad)
            for sink in sinks:
                sink(records)
            if bar is not None:
                bar.update(len(records) + len(bad))
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise SpachError(f"a data loader worker died ({str(e).strip().splitlines()[0][:160]}); the usual cause is the "
                         f"out-of-memory killer: lower --num-workers or --batch-size, then rerun") from None
    return unreadable


def run(args) -> int:
    _check_flags(args)
    device = _device(args.device)
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(ResultsFile(args.output)) if args.output else None
        model, info = build_model(args.model, args.checkpoint, img_size=args.img_size, use_ema=args.use_ema,
                                  crop_pct=args.crop_pct)
        paths, skipped = image_paths(args.images)
        for line in skipped:
            warn(line)
        sinks, printer = [], JsonPrinter(info) if args.json else None
        if output is not None:
            output.start(min(args.topk, info.num_classes))
            sinks.append(output.add)
        if printer is not None:
            sinks.append(printer.add)
        table = not args.json and (output is None or len(paths) <= TABLE_MAX)
        if table:
            sinks.append(print_table)
        with _progress(len(paths), shown=table) as bar:
            unreadable = _stream(model, info, paths, args, device, sinks, bar)
        if printer is not None:
            printer.close()
        if output is not None:
            output.commit()
            # with --json, stdout holds one JSON document: the summary goes to stderr
            n = output.rows
            print(f"wrote {n} prediction{'' if n == 1 else 's'} to {output.path}",
                  file=sys.stderr if args.json else sys.stdout)
    if unreadable:
        where = f"; the other {len(paths) - unreadable} are in {args.output}" if args.output else ""
        raise DataError(f"{unreadable} of {len(paths)} images could not be read (each named above){where}")
    return 0
