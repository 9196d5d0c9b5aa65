"""What ``spach export --format hf`` writes beside ``model.safetensors``: timm's ``config.json`` and a model card.

``config.json`` is timm's Hugging Face layout (``timm/models/_hub.py``: ``architecture``, ``num_classes``,
``label_names``, ``model_args`` for the constructor, ``pretrained_cfg`` for the preprocessing), so that
``timm.create_model('local-dir:FOLDER', pretrained=True)`` (after ``import spach``) and ``hf-hub:`` ids rebuild the
model; spach reads the same file (:func:`spach.weights.open_weights`).

The model card (``README.md``) is built from what the checkpoint holds (a training checkpoint: ``args``,
``max_accuracy``, ``log_stats``, ``class_names``) and from the run folder's ``log.txt`` (one JSON line per epoch).
All of it is untrusted: only finite numbers are shown as results.
"""
import json
import math
import os
from typing import List, Optional

from torch import nn

from ..inference import ModelInfo
from ..weights import HF_CONFIG, WeightsFile

__all__ = ["hf_config", "model_card", "run_log"]

# pretrained_cfg keys that say where the source weights were (a release URL, a local file): not these weights
SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "tag")
# log.txt / log_stats keys shown as results: (key, column title, is a percentage)
RESULT_KEYS = (("test_acc1", "top-1 %"), ("test_acc5", "top-5 %"), ("test_loss", "loss"),
               ("test_ema_acc1", "EMA top-1 %"))
# more class names than this are summarised in the card (a 1000-class list is long; config.json has them all)
MAX_LISTED_CLASSES = 50
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def hf_config(model: nn.Module, info: ModelInfo) -> dict:
    """timm's ``config.json`` for ``model`` as built for ``info``: the architecture, its constructor arguments
    (input size, variant options), the class count and names, and the preprocessing."""
    h, w = info.img_size
    cfg = {k: v for k, v in info.pretrained_cfg.items() if k not in SOURCE_KEYS and v is not None}
    cfg.update(architecture=info.model_name, num_classes=info.num_classes, input_size=[3, h, w],
               fixed_input_size=bool(getattr(model, "fixed_input_size", False)))
    for key in ("label_names", "label_descriptions", "label_offset"):
        cfg.pop(key, None)  # the release's labels (ImageNet) are not this head's; label_names below are
    if (h, w) != tuple(info.pretrained_cfg.get("input_size", (3, 224, 224)))[1:]:
        cfg.pop("pool_size", None)  # the registry's pool size is for its own input size
    config = {"architecture": cfg.pop("architecture"), "num_classes": info.num_classes,
              "num_features": int(model.num_features), "global_pool": "avg"}
    if info.class_names:
        config["label_names"] = list(info.class_names)
    config["model_args"] = {"img_size": h if h == w else [h, w], **info.model_kwargs}
    config["pretrained_cfg"] = json.loads(json.dumps(cfg))  # tuples as lists, as json writes them
    return config


def run_log(weights: Optional[WeightsFile]) -> List[dict]:
    """The per-epoch JSON lines of the training run's ``log.txt`` beside a local checkpoint file (empty if there
    is none: a release file, a folder, a URL). Lines that are not an epoch's JSON object are skipped."""
    if weights is None or weights.contents is None or weights.path != weights.source:
        return []
    path = os.path.join(os.path.dirname(os.path.abspath(weights.path)), "log.txt")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool):
                rows.append(row)
    return rows


def _number(value) -> Optional[float]:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _result_row(title: str, row: dict, columns) -> str:
    epoch = row.get("epoch")
    shown = [f"{c:.2f}" if c is not None else "" for c in (_number(row.get(key)) for key, _ in columns)]
    return f"| {title} | {epoch + 1 if isinstance(epoch, int) else ''} | " + " | ".join(shown) + " |"


def _results(weights: Optional[WeightsFile], log: List[dict]) -> List[str]:
    """The final and best evaluation of the run: log.txt's last and best lines, else the checkpoint's own
    ``log_stats``; the checkpoint's ``max_accuracy``."""
    contents = weights.contents if weights is not None and isinstance(weights.contents, dict) else {}
    stats = contents.get("log_stats") if isinstance(contents.get("log_stats"), dict) else None
    final = log[-1] if log else stats
    scored = [r for r in log if _number(r.get("test_acc1")) is not None]
    best = max(scored, key=lambda r: r["test_acc1"]) if scored else None
    shown = [(title, row) for title, row in (("final", final), ("best", best)) if row]
    # the columns some row has a number in (no EMA column for a run without EMA)
    columns = [(k, t) for k, t in RESULT_KEYS if any(_number(row.get(k)) is not None for _, row in shown)]
    lines = []
    if columns:
        lines += ["| evaluation | epoch | " + " | ".join(t for _, t in columns) + " |",
                  "| --- | --- |" + " --- |" * len(columns),
                  *(_result_row(title, row, columns) for title, row in shown), ""]
    best_acc = _number(contents.get("max_accuracy"))
    if best_acc is not None:
        lines.append(f"Best validation top-1 of the run: **{best_acc:.2f}%**.")
    epoch = weights.facts.get("epoch") if weights is not None else None
    if epoch is not None:
        lines.append(f"These weights are the checkpoint of epoch {epoch + 1}"
                     + (f" (of {len(log)} logged)." if log else "."))
    return lines or ["No evaluation results were recorded with these weights."]


def _count_images(folder: str) -> Optional[int]:
    if not os.path.isdir(folder):
        return None
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(1 for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    return total


def _training_data(info: ModelInfo, args: Optional[dict]) -> List[str]:
    names = info.class_names
    lines = []
    if args is not None:
        data_path = args.get("data_path")
        where = f"`{data_path}`" if isinstance(data_path, str) and data_path else "the embedded MNIST-5k demo dataset"
        data_set = args.get("data_set")
        lines.append(f"- Dataset: {where}" + (f" (`--data-set {data_set}`)" if isinstance(data_set, str) else ""))
        if isinstance(data_path, str) and data_path:
            counts = {split: _count_images(os.path.join(data_path, split)) for split in ("train", "val")}
            if all(c is not None for c in counts.values()):
                lines.append(f"- Images: {counts['train']} train, {counts['val']} validation")
            else:
                lines.append("- Images: not counted (the dataset folder is not on this machine)")
    else:
        lines.append("- Dataset: not recorded with these weights (a 1000-class head is ImageNet-1k's)"
                     if info.num_classes == 1000 else "- Dataset: not recorded with these weights")
    lines.append(f"- Classes: {info.num_classes}")
    if names:
        shown = ", ".join(f"`{n}`" for n in names[:MAX_LISTED_CLASSES])
        more = f" and {len(names) - MAX_LISTED_CLASSES} more (all in `{HF_CONFIG}`)" if len(names) > MAX_LISTED_CLASSES else ""
        lines.append(f"- Class names (index order): {shown}{more}")
    return lines


def model_card(model: nn.Module, info: ModelInfo, weights: Optional[WeightsFile], flops: Optional[int],
               repo_id: str = "ORG/NAME") -> str:
    """The ``README.md`` of an exported folder: what the model is (name, paper, size), what it was trained on,
    how (the resolved training flags), how well it does (the run's final and best evaluation), how to load it,
    its license and its citation. ``flops``: one forward pass at the model's input size."""
    cfg = info.pretrained_cfg
    h, w = info.img_size
    license_id = str(cfg.get("license") or "mit")
    n_params = sum(p.numel() for p in model.parameters())
    args = weights.args if weights is not None else None
    paper = cfg.get("paper_name")
    paper_id = str(cfg.get("paper_ids") or "")
    paper_link = (f"[{paper_id}](https://arxiv.org/abs/{paper_id.split(':', 1)[1]})"
                  if paper_id.startswith("arXiv:") else paper_id)
    options = ", ".join(f"`{k}={v}`" for k, v in info.model_kwargs.items())
    lines = [
        "---", f"license: {license_id}", "library_name: timm", "pipeline_tag: image-classification",
        "tags:", "- image-classification", "- timm", "- spach", "---", "",
        f"# {info.model_name}", "",
        f"An image classifier of the `{info.model_name}` architecture"
        + (f" ({cfg['description']})" if cfg.get("description") else "")
        + (f", from *{paper}* ({paper_link})" if paper else "") + ", exported by `spach export --format hf`.", "",
        "## Model details", "",
        f"- Architecture: `{info.model_name}` ({type(model).__name__})" + (f", {options}" if options else ""),
        f"- Parameters: {n_params / 1e6:.2f} M",
        f"- GFLOPs: {flops / 1e9:.3f} (multiply-accumulates) at {h}x{w}" if flops is not None else "- GFLOPs: not counted",
        f"- Input: {h}x{w} RGB, resized by crop_pct {cfg.get('crop_pct')} ({cfg.get('interpolation')}) and "
        f"center-cropped, normalised with mean {list(cfg.get('mean', ()))} and std {list(cfg.get('std', ()))}",
        f"- Output: logits over {info.num_classes} classes",
        f"- Code: {cfg['origin_url']} (original), spach (this implementation)" if cfg.get("origin_url") else
        "- Code: spach", "",
        "## How to use", "",
        "```python",
        "import spach  # registers the architectures with timm",
        "import timm",
        f"model = timm.create_model(\"hf-hub:{repo_id}\", pretrained=True).eval()",
        f"# or spach.create_model(\"hf-hub:{repo_id}\"); from a local copy: timm.create_model(\"local-dir:FOLDER\", "
        "pretrained=True)",
        "```", "",
        "```bash",
        f"spach predict --checkpoint hf-hub:{repo_id} image.jpg",
        f"spach eval --checkpoint hf-hub:{repo_id} --model {info.model_name} --input-size {h} --data-path DATA",
        "```", "",
        "## Training data", "", *_training_data(info, args), "",
        "## Training configuration", "",
    ]
    if args is not None:
        lines += ["The resolved flags of the training run (`spach train`):", "", "```json",
                  json.dumps(args, indent=1, sort_keys=True, default=str), "```"]
    else:
        lines.append("Not recorded with these weights (not a `spach train` checkpoint).")
    lines += ["", "## Evaluation results", "", *_results(weights, run_log(weights)), "",
              "## License", "",
              f"{license_id.upper() if license_id == 'mit' else license_id}: the architecture's code and this "
              f"export. The data the weights were trained on may carry its own terms.", ""]
    citation = getattr(model, "citation", "")
    if citation:
        lines += ["## Citation", "", "```bibtex", citation, "```", ""]
    return "\n".join(lines)
