"""Building a model for inference from a checkpoint, and the facts a checkpoint carries about itself.

A checkpoint may say which model it holds, how many classes, at what input size it was trained and what
the classes are called: our training checkpoints (``{'model', 'args', 'class_names', ...}``), safetensors
files written by ``spach export`` (string metadata), model folders (``config.json``; also as ``hf-hub:`` ids) and
official releases (``{'model': sd}``, 1000 ImageNet classes). The file is opened once
(:func:`spach.weights.open_weights`). :func:`build_model` turns that into a ready, ``eval()``-mode model plus a :class:`ModelInfo`;
the ``export`` and ``predict`` commands share it.
"""
import sys
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

from torch import nn

from .errors import SpachError
from .weights import arch_options, is_url, open_weights

__all__ = ["ModelInfo", "read_checkpoint_metadata", "build_model", "eval_transform", "class_label",
           "imagenet_class_names", "warn", "predict_batches"]

# safetensors metadata keys written by ``spach export --format safetensors`` (values are JSON strings)
METADATA_KEYS = ("model", "num_classes", "img_size", "class_names", "mean", "std", "crop_pct", "interpolation",
                 "spach_version")


def warn(message: str) -> None:
    print(f"spach: warning: {message}", file=sys.stderr)


@dataclass
class ModelInfo:
    """What we know about a built model: its name, classes, input size and where its weights came from."""

    model_name: str
    num_classes: int
    img_size: Tuple[int, int]
    class_names: Optional[List[str]] = None
    checkpoint: Optional[str] = None
    pretrained_cfg: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)  # the architecture options it was built with (arch_options())

    def metadata(self) -> dict:
        """JSON-serialisable description (the safetensors / ONNX / TorchScript metadata)."""
        from . import __version__
        cfg = self.pretrained_cfg
        values = {
            "model": self.model_name, "num_classes": self.num_classes, "img_size": list(self.img_size),
            "class_names": self.class_names, "mean": list(cfg.get("mean", ())), "std": list(cfg.get("std", ())),
            "crop_pct": cfg.get("crop_pct"), "interpolation": cfg.get("interpolation"), "spach_version": __version__,
        }
        out = {k: values[k] for k in METADATA_KEYS}
        out.update({k: v for k, v in self.model_kwargs.items() if k in arch_options()})
        return out


def _as_size(value) -> Optional[Tuple[int, int]]:
    """An input size from a flag or checkpoint: 224, [224, 224], [3, 224, 224] (timm's input_size)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return (int(value), int(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        value = [int(v) for v in value]
        if len(value) == 3:
            value = value[1:]
        if len(value) == 1:
            return (value[0], value[0])
        if len(value) == 2:
            return (value[0], value[1])
    return None


def _as_crop_pct(value) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    return None


def _classifier_keys():
    """``<classifier>.weight`` of every registered model family (``head``, sMLPNet's ``mlp_head.0``)."""
    from .models import list_models
    from .models.pretrained import classifier_keys
    return classifier_keys(list_models())


def read_checkpoint_metadata(path, use_ema: bool = False) -> dict:
    """What a checkpoint (a path, or a :class:`~spach.weights.WeightsFile` opened already) says about itself: any
    of ``model``, ``num_classes`` (its classifier's rows), ``img_size`` (a pair), ``class_names``, ``crop_pct`` (the
    eval crop it was trained with), ``epoch`` and its architecture options. Missing facts are simply absent.
    Reading is as safe as loading the weights (``weights_only``); an unreadable file raises
    :class:`~spach.errors.CheckpointError`."""
    from .models.pretrained import file_head_classes
    weights = open_weights(path)
    meta = dict(weights.facts)
    if weights.contents is not None and not isinstance(weights.contents, dict):
        return meta  # not a checkpoint: loading its weights says so
    n = file_head_classes(weights, _classifier_keys(), use_ema)
    if n is not None:
        meta["num_classes"] = n
    return meta


def build_model(model_name: Optional[str], checkpoint=None, img_size=None,
                use_ema: bool = False, num_classes: Optional[int] = None,
                crop_pct: Optional[float] = None) -> Tuple[nn.Module, ModelInfo]:
    """Create ``model_name`` (or the model the checkpoint names) shaped like ``checkpoint`` (classes and
    input size read from it; ``img_size`` overrides), load its weights strictly and switch to eval mode.
    ``checkpoint``: anything :func:`spach.weights.open_weights` opens (a file, a model folder, an ``hf-hub:`` id, a
    URL), read from disk once. The eval crop is the checkpoint's (``crop_pct`` overrides), else the model's
    pretrained config's. Without a checkpoint the model is randomly initialised (a warning says so)."""
    from .models import arch_from_checkpoint, create_model

    if crop_pct is not None and not _as_crop_pct(crop_pct):
        raise SpachError(f"--crop-pct must be in (0, 1] (got {crop_pct})")
    weights = open_weights(checkpoint) if checkpoint else None
    if weights:  # an http(s) URL is named by the copy downloaded once into torch hub's cache
        checkpoint = weights.path if is_url(weights.source) else weights.source
    meta = read_checkpoint_metadata(weights, use_ema=use_ema) if weights else {}
    if model_name is None:
        model_name = meta.get("model")
        if model_name is None:
            where = f"checkpoint {checkpoint} does not name its model" if checkpoint else "no --checkpoint given"
            raise SpachError(f"{where}: pass --model NAME (`spach models` lists them)")
    elif meta.get("model") and meta["model"] != model_name:
        warn(f"checkpoint {checkpoint} was trained as {meta['model']}; building {model_name} as asked")
    from .models.sizes import MAX_INPUT_SIZE, input_size_problem
    size = _as_size(img_size) if img_size is not None else meta.get("img_size")
    if img_size is not None and (size is None or not all(1 <= v <= MAX_INPUT_SIZE for v in size)):
        raise SpachError(f"--img-size {img_size} is out of range: pass a size in 1..{MAX_INPUT_SIZE} (or leave it "
                         f"out to use the checkpoint's training size)")
    n = meta.get("num_classes") if num_classes is None else num_classes
    kwargs = {}
    if size is not None:
        kwargs["img_size"] = size
    if n is not None:
        kwargs["num_classes"] = n
    try:
        if weights:  # the variant the file records or its weights fix; the weights load after the checks
            arch_from_checkpoint(model_name, weights, use_ema, kwargs)
        model = create_model(model_name, **kwargs)
    except SpachError:
        raise
    except (ValueError, TypeError) as e:  # e.g. an image size the patch grid cannot take
        raise SpachError(f"cannot build {model_name} with {kwargs}: {e}") from None
    flag = "--img-size" if img_size is not None else f"the input size stored in {checkpoint}"
    problem = input_size_problem(model, tuple(model.img_size), flag)
    if problem:
        raise SpachError(problem)
    trained = meta.get("img_size")
    if (img_size is not None and trained and tuple(trained) != tuple(model.img_size)
            and getattr(model, "fixed_input_size", False)):
        raise SpachError(f"--img-size {img_size} does not fit {model_name} from {checkpoint}: its token-mixing MLPs "
                         f"were trained for a {trained[0]}x{trained[1]} input and take no other; pass --img-size "
                         f"{trained[0]} or leave it out")
    if weights:
        from .models import load_pretrained
        load_pretrained(model, weights, use_ema=use_ema)
    else:
        warn(f"no --checkpoint: {model_name} has random weights (its outputs mean nothing)")
    model.eval()
    names = meta.get("class_names")
    if names is not None and len(names) != model.num_classes:
        warn(f"checkpoint {checkpoint} lists {len(names)} class names for a {model.num_classes}-class head; "
             f"ignoring the names")
        names = None
    cfg = dict(model.pretrained_cfg or {})
    if crop_pct is not None:
        cfg["crop_pct"] = float(crop_pct)
    elif meta.get("crop_pct"):
        cfg["crop_pct"] = meta["crop_pct"]
    info = ModelInfo(model_name=model_name, num_classes=model.num_classes, img_size=tuple(model.img_size),
                     class_names=names, checkpoint=checkpoint, pretrained_cfg=cfg,
                     model_kwargs={k: kwargs[k] for k in arch_options() if k in kwargs})
    return model, info


def eval_transform(info: ModelInfo):
    """The evaluation preset (:func:`spach.data.transforms.build_eval_transform`) with the crop, interpolation
    and mean / std of the model's pretrained config, at its input size."""
    from .data.transforms import build_eval_transform
    cfg = info.pretrained_cfg
    return build_eval_transform(info.img_size, crop_pct=cfg.get("crop_pct"), interpolation=cfg.get("interpolation"),
                                mean=cfg.get("mean"), std=cfg.get("std"))


_IMAGENET_NAMES = None


def imagenet_class_names() -> Optional[List[str]]:
    """The 1000 ImageNet-1k class descriptions in index order, from timm's offline tables (None if this
    timm does not ship them)."""
    global _IMAGENET_NAMES
    if _IMAGENET_NAMES is None:
        try:
            from timm.data import ImageNetInfo
            info = ImageNetInfo()
            _IMAGENET_NAMES = [info.index_to_description(i) for i in range(info.num_classes())]
        except Exception:  # older timm, missing resource files
            _IMAGENET_NAMES = []
    return _IMAGENET_NAMES if len(_IMAGENET_NAMES) == 1000 else None


def class_label(info: ModelInfo, index: int) -> Optional[str]:
    """Name of class ``index``: the checkpoint's class names, else ImageNet's for a 1000-class head."""
    if info.class_names is not None:
        return info.class_names[index]
    if info.num_classes == 1000:
        names = imagenet_class_names()
        if names:
            return names[index]
    return None


def _record(info: ModelInfo, path: str, probs: List[float], indices: List[int]) -> dict:
    return {"image": path, "predictions": [
        {"rank": r + 1, "class_index": idx, "class_name": class_label(info, idx), "probability": p}
        for r, (p, idx) in enumerate(zip(probs, indices))]}


def predict_batches(model: nn.Module, info: ModelInfo, paths: Sequence[str], topk: int = 5, batch_size: int = 32,
                    device="cpu", num_workers: int = 0) -> Iterator[Tuple[List[dict], List[Tuple[str, str]]]]:
    """The top-``topk`` predictions of the images at ``paths``, one batch at a time: ``(records, unreadable)``
    with a record ``{'image', 'predictions': [{'rank', 'class_index', 'class_name', 'probability'}]}`` per image
    read and ``(path, why)`` per image that could not be. A DataLoader decodes the images (in ``num_workers``
    processes when > 0) at most a few batches ahead of the model, so memory does not grow with ``len(paths)``."""
    import torch
    from torch.utils.data import DataLoader
    from .data.image_list import ImageFiles, collate_images
    from .models.fused import packed_weights
    device = torch.device(device)
    loader = DataLoader(ImageFiles(paths, eval_transform(info)), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_images, pin_memory=device.type == "cuda")
    k = min(topk, info.num_classes)
    model = model.to(device)
    with torch.no_grad(), packed_weights(model):
        for indices, batch, unreadable in loader:
            records = []
            if batch is not None:
                probs = model(batch.to(device)).float().softmax(dim=-1).cpu()
                values, classes = probs.topk(k, dim=-1)
                records = [_record(info, paths[i], v, c) for i, v, c in zip(indices, values.tolist(), classes.tolist())]
            yield records, [(paths[i], why) for i, why in unreadable]
