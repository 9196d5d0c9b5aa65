"""Loading weights: official SPACH release files, training checkpoints, bare state_dicts, safetensors.

A checkpoint is untrusted input: ``.pth`` files are read with ``torch.load(weights_only=True)`` (no code in a
pickle can run) and ``.safetensors`` with :mod:`safetensors`. Anything that does not fit the model is refused
with the missing / unexpected / mis-shaped keys listed.
"""
import hashlib
import os
import pickle
import re
import urllib.parse
import urllib.request
from typing import Dict, Optional

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["read_state_dict", "load_pretrained", "load_pretrained_release", "checkpoint_filter_fn",
           "safetensors_model_kwargs", "is_url", "local_weights"]

_WRAPPER_KEYS_EMA = ("model_ema", "state_dict_ema")
_WRAPPER_KEYS = ("model", "state_dict", "module")


def _last_line(text: str) -> str:
    """The informative line of torch's long weights_only error."""
    match = re.search(r"([^\n]*unsupported GLOBAL[^\n]*|Unsupported [^\n]*|invalid load key[^\n]*)", text)
    if match:
        return match.group(1).strip()[:200]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "no detail")[:200]


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e)
        if "Unsupported global" not in detail and "GLOBAL" not in detail:
            raise CheckpointError(
                f"cannot read checkpoint {path}: it is not a weights-only PyTorch checkpoint (truncated, corrupted, "
                f"or a raw pickle, which is refused because it could run code: {_last_line(detail)}); "
                f"use a complete .pth / .safetensors file") from None
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain containers "
            f"(loading it could run code). Re-save its state_dict with torch.save, or convert it to .safetensors "
            f"({_last_line(detail)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or not a PyTorch checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}); "
            f"use a complete .pth / .safetensors file") from None


def read_state_dict(path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read a state_dict from ``path``: ``{'model': sd}`` (the official releases and our training
    checkpoints), ``{'model_ema': sd}``, ``{'state_dict': sd}``, a bare state_dict, or ``.safetensors``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file): pass the path of a "
                              f".pth or .safetensors weights file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state_dict: save "
                              f"model.state_dict() (or {{'model': model.state_dict()}})")
    keys = _WRAPPER_KEYS_EMA + _WRAPPER_KEYS if use_ema else _WRAPPER_KEYS + _WRAPPER_KEYS_EMA
    for key in keys:
        if key in ckpt and isinstance(ckpt[key], dict):
            if use_ema and key in _WRAPPER_KEYS and any(k in ckpt for k in _WRAPPER_KEYS_EMA):
                continue
            if use_ema and key not in _WRAPPER_KEYS_EMA:
                raise CheckpointError(f"checkpoint {path} has no EMA weights ('model_ema'): load it without use_ema")
            ckpt = ckpt[key]
            break
    tensors = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} contains no tensors (keys: {sorted(ckpt)[:8]}): "
                              f"it is not a weights file")
    return tensors


def safetensors_model_kwargs(path: str) -> dict:
    """``num_classes`` / ``img_size`` recorded in a ``.safetensors`` file's metadata (``spach export`` writes
    them as JSON strings), so the file alone rebuilds the model it came from."""
    import json
    try:
        from safetensors import safe_open
        with safe_open(os.fspath(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception:  # unreadable files are reported by read_state_dict with a clear message
        return {}
    out = {}
    for key in ("num_classes", "img_size"):
        try:
            value = json.loads(raw[key]) if key in raw else None
        except (TypeError, ValueError):
            continue
        if key == "num_classes" and isinstance(value, int):
            out[key] = value
        elif key == "img_size" and isinstance(value, (int, list)):
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt an original-layout state_dict to ``model``: strip DDP / wrapper prefixes. Original SPACH
    checkpoints already use this package's names, so nothing is renamed."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    # features_only models wrap the network in timm's FeatureGetterNet (attribute ``model``)
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "stem") else model


def _describe(keys, n=8):
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_pretrained(model: nn.Module, path: str, use_ema: bool = False, strict: bool = True) -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place; returns ``model``).

    With ``strict`` (default) every key must match in name and shape; otherwise a :class:`CheckpointError`
    lists what is missing, unexpected or mis-shaped. ``strict=False`` skips the keys a pruned
    (``features_only`` / ``num_classes=0``) model no longer has, but shapes must still agree.
    """
    target = _unwrap(model)
    state_dict = checkpoint_filter_fn(read_state_dict(path, use_ema=use_ema), target)
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
    target.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return model


_URL_SCHEMES = ("http://", "https://", "file://")


def is_url(path) -> bool:
    return isinstance(path, str) and path.lower().startswith(_URL_SCHEMES)


def _download(url: str, cached: str, hint: str, what: str = "") -> str:
    """``cached``, downloaded from ``url`` unless it is there (to a temporary name, then renamed: an interrupted
    download never leaves a partial file under the cached name)."""
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(url, cached, progress=False)
        except Exception as e:  # no network, HTTP error, DNS failure, unwritable cache ...
            raise CheckpointError(
                f"could not download {what}{url} ({type(e).__name__}: {str(e)[:160]}). Download that file yourself "
                f"and {hint}, or place it at {cached}") from None
    return cached


def local_weights(path: str) -> str:
    """``path`` itself; for a file:// URL its path; for an http(s):// URL (as the original's ``--resume`` /
    ``--finetune`` / ``--teacher-path`` accept) a copy downloaded once into torch hub's cache, in a folder of its
    own per URL (two runs' ``best.pth`` never stand in for each other)."""
    if not is_url(path):
        return path
    parsed = urllib.parse.urlparse(path)
    if parsed.scheme.lower() == "file":
        return urllib.request.url2pathname(parsed.path)
    file_name = os.path.basename(parsed.path)
    if not file_name:
        raise CheckpointError(f"{path} does not name a weights file: pass the URL of a .pth / .safetensors file")
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", f"url-{key}", file_name)
    return _download(path, cached, "pass its local path instead of the URL")


def load_pretrained_release(model: nn.Module, variant: str, strict: bool = True) -> nn.Module:
    """``pretrained=True``: the official release file, from ``pretrained_cfg['file']`` if set (a local
    file), else torch hub's cache, else downloaded. Without network this fails with the URL to fetch.
    ``strict=False`` for a pruned (``features_only``) model, as :func:`load_pretrained`."""
    target = _unwrap(model)
    cfg = dict(getattr(target, "pretrained_cfg", {}) or {})
    local = cfg.get("file")
    if local:
        return load_pretrained(model, local, strict=strict)
    url = cfg.get("url")
    if not url:
        raise CheckpointError(
            f"no official weights were released for {variant}: train it with `spach train --model {variant}` "
            f"or pass your own file with checkpoint_path=...")
    file_name = os.path.basename(urllib.parse.urlparse(url).path)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)  # torch hub's own place for it
    hint = (f"pass it: spach.create_model('{variant}', checkpoint_path='{file_name}') (CLI: --resume/--checkpoint "
            f"{file_name})")
    return load_pretrained(model, _download(url, cached, hint, what=f"the pretrained weights of {variant} from "),
                           strict=strict)
