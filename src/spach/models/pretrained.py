"""Loading weights into a SPACH model: official release files, training checkpoints, bare state_dicts,
safetensors, model folders and ``hf-hub:`` ids (all read by :mod:`spach.weights`). Anything that does not fit the
model is refused with the missing / unexpected / mis-shaped keys listed.
"""
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..errors import CheckpointError
from ..weights import HF_PREFIX, WeightsFile, open_weights, release_file, stored_facts, strip_prefixes, url_file_name

from .base import BaseNet

# stored_facts: train/resume.py imports it from here
__all__ = ["load_pretrained", "check_weight_values", "load_pretrained_release", "checkpoint_filter_fn", "file_model_kwargs",
           "classifier_keys", "head_classes", "file_head_classes", "stored_facts"]


def classifier_keys(model_names: Sequence[str]) -> list:
    """``<classifier>.weight`` of the named models (``head``, sMLPNet's ``mlp_head.0``), from their pretrained cfgs."""
    from timm.models import get_pretrained_cfg
    return sorted({(getattr(get_pretrained_cfg(n), "classifier", None) or "head") + ".weight" for n in model_names})


def head_classes(state_dict: Dict[str, torch.Tensor], keys: Sequence[str]) -> Optional[int]:
    """The class count of the first classifier weight among ``keys`` that ``state_dict`` holds (prefixes ignored)."""
    sd = strip_prefixes(state_dict)
    for key in keys:
        w = sd.get(key)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return int(w.shape[0])
    return None


def file_head_classes(weights: WeightsFile, keys: Sequence[str], use_ema: bool = False) -> Optional[int]:
    """The class count of the first classifier weight among ``keys`` that the file holds (a safetensors file
    answers from its header)."""
    for key in keys:
        shape = weights.tensor_shape(key, use_ema)
        if shape is not None and len(shape) == 2:
            return int(shape[0])
    return None


def file_model_kwargs(model_name: str, weights, use_ema: bool = False) -> dict:
    """``num_classes`` / ``img_size`` that the weights (a path or an opened :class:`~spach.weights.WeightsFile`)
    fix for ``model_name``, so that the file alone rebuilds the model it holds: its classifier rows (else the
    class count it records) and the input size it records (a training run's, an export's): a 10-class run at 64x64
    builds a 10-class model for 64x64."""
    weights = open_weights(weights)
    out = {}
    size = weights.facts.get("img_size")
    if size is not None:
        out["img_size"] = size[0] if size[0] == size[1] else size
    n = file_head_classes(weights, classifier_keys([model_name]), use_ema)
    n = weights.facts.get("num_classes") if n is None else n
    if n is not None:
        out["num_classes"] = n
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt an original-layout state_dict to ``model``: strip DDP / wrapper prefixes. Original SPACH
    checkpoints already use this package's names, so nothing is renamed."""
    return strip_prefixes(state_dict)


def _unwrap(model: nn.Module) -> nn.Module:
    # features_only models wrap the network in timm's FeatureGetterNet (attribute ``model``)
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, BaseNet) else model


def _describe(keys, n=8):
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_pretrained(model: nn.Module, path, use_ema: bool = False, strict: bool = True) -> nn.Module:
    """Load weights from ``path`` (anything :func:`~spach.weights.open_weights` opens, or a
    :class:`~spach.weights.WeightsFile` opened already) into ``model`` (in place; returns ``model``).

    With ``strict`` (default) every key must match in name and shape; otherwise a :class:`CheckpointError`
    lists what is missing, unexpected or mis-shaped. ``strict=False`` skips the keys a pruned
    (``features_only`` / ``num_classes=0``) model no longer has, but shapes must still agree.
    """
    target = _unwrap(model)
    weights = open_weights(path)
    path = weights.source
    state_dict = checkpoint_filter_fn(weights.state_dict(use_ema), target)
    own = target.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if not strict:
        unexpected = []
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected or mis_shaped:
        name = getattr(target, "pretrained_cfg", {}).get("architecture", type(target).__name__)
        hint = getattr(target, "checkpoint_mismatch_hint", None)
        hint = hint(state_dict) if callable(hint) else None
        if hint:  # the family knows what this mismatch means (e.g. ShiftViT's other normalization)
            raise CheckpointError(f"checkpoint {path} does not fit model {name}: {hint}")
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_describe(unexpected)}")
        if mis_shaped:
            parts.append(f"{len(mis_shaped)} mis-shaped: {_describe(mis_shaped, 4)}")
        raise CheckpointError(
            f"checkpoint {path} does not fit model {name}: " + "; ".join(parts) +
            ". Check that --model names the architecture the checkpoint was trained with "
            "(and num_classes / img_size match, or use --finetune to re-initialise the head)")
    check_weight_values(state_dict, target, path)
    target.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return model


def check_weight_values(state_dict, model: nn.Module, path) -> None:
    """Refuse weights a model would load without a word but compute nonsense with: integer or bool tensors where
    the model holds floats (``load_state_dict`` casts them: an int64 file loads as whole numbers, a bool one as
    0 / 1), and non-finite weights. float16 / bfloat16 / float64 tensors convert, as torch converts them."""
    own = model.state_dict()
    wrong = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in state_dict.items()
             if k in own and own[k].is_floating_point() and not (v.is_floating_point() or v.is_complex())]
    if wrong:
        raise CheckpointError(f"checkpoint {path} stores {len(wrong)} weights as integers or booleans where the model "
                              f"has floating-point ones ({_describe(wrong, 3)}): the file is damaged or was not "
                              f"written from this model; use another file")
    params = dict(model.named_parameters())
    bad = [k for k, v in state_dict.items()
           if k in params and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights (NaN/inf) in {len(bad)} tensors "
                              f"({_describe(bad, 3)}): a model with them outputs nothing meaningful; use an earlier "
                              f"checkpoint")


def load_pretrained_release(model: nn.Module, variant: str, strict: bool = True) -> nn.Module:
    """``pretrained=True``: the official release file, from ``pretrained_cfg['file']`` if set (a local
    file, or the folder of timm's ``local-dir:``), the Hugging Face repo of timm's ``hf-hub:`` ids, else torch hub's
    cache, else downloaded. Without network this fails with the URL to fetch. ``strict=False`` for a pruned
    (``features_only``) model, as :func:`load_pretrained`."""
    target = _unwrap(model)
    cfg = dict(getattr(target, "pretrained_cfg", {}) or {})
    if cfg.get("source") == "hf-hub" and cfg.get("hf_hub_id"):  # timm.create_model("hf-hub:ORG/NAME")
        return load_pretrained(model, HF_PREFIX + cfg["hf_hub_id"], strict=strict)
    local = cfg.get("file")
    if local:
        return load_pretrained(model, local, strict=strict)
    url = cfg.get("url")
    if not url:
        raise CheckpointError(
            f"no official weights were released for {variant}: train it with `spach train --model {variant}` "
            f"or pass your own file with checkpoint_path=...")
    file_name = url_file_name(url)
    hint = (f"pass it: spach.create_model('{variant}', checkpoint_path='{file_name}') (CLI: --resume/--checkpoint "
            f"{file_name})")
    return load_pretrained(model, release_file(url, hint, what=f"the pretrained weights of {variant} from "),
                           strict=strict)
