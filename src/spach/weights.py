"""The one reader of weights files: training checkpoints, official release files, bare state_dicts, safetensors.

A checkpoint is untrusted input: ``.pth`` files are read with ``torch.load(weights_only=True)`` (no code in a
pickle can run) and ``.safetensors`` with :mod:`safetensors`. Every way a file can fail to read (missing,
truncated, random bytes, a pickle holding code) is one :class:`~spach.errors.CheckpointError` line naming the
file and the fix, whichever command reads it.

Weights may also be given as URLs, as the original's ``--resume https://...``: :func:`local_weights` turns an
http(s) URL into a file downloaded once into torch hub's cache, and a file:// URL into its path.
"""
import hashlib
import json
import os
import pickle
import re
import urllib.parse
import urllib.request
import warnings
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch

from .errors import CheckpointError
from .files import regular_file_problem

__all__ = ["read_checkpoint_file", "stored_facts", "unwrap_state_dict", "strip_prefixes", "read_state_dict", "safetensors_metadata",
           "safetensors_shape", "is_url", "url_file_name", "local_weights", "release_file", "ARCH_OPTIONS",
           "stored_model_options", "state_dict_of", "read_once"]

# architecture options a file records beside its weights (a training run's flags, an export's metadata) that
# rebuild the right variant: keys that differ (stems, shared mixers) and ones that do not (ShiftViT's activation)
ARCH_OPTIONS = ("stem_type", "shared_spatial_func", "norm_layer", "act_layer")

# where training scripts put the weights inside a checkpoint (SPACH / DeiT ``main.py``: ``model``, ``model_ema``)
EMA_KEYS = ("model_ema", "state_dict_ema")
WRAPPER_KEYS = ("model", "state_dict", "module")
# what DDP (``module.``) and torch.compile (``_orig_mod.``) put in front of every key
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
URL_SCHEMES = ("http://", "https://", "file://")


def _exists(path: str) -> None:
    """Only a regular file is read: a folder or a FIFO / device is named as what it is (open() of a FIFO would
    wait forever)."""
    problem = regular_file_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}: pass the path of a .pth or .safetensors weights file")


def _last_line(text: str) -> str:
    """The informative line of torch's long weights_only error (never its advice to set weights_only=False)."""
    match = re.search(r"([^\n]*unsupported GLOBAL[^\n]*|Unsupported [^\n]*|invalid load key[^\n]*)", text)
    if match:
        return match.group(1).strip()[:200]
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and "weights_only" not in ln and "Check the documentation" not in ln]
    return (lines[-1] if lines else "no detail")[:200]


# the global a weights-only load refused, when it names one (random bytes do not spell a dotted name)
_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+) (?:was|whose)")


# while a read_once() scope is open: (real path, kind) -> ((mtime_ns, size), what the file held)
_read_scope: Optional[dict] = None


@contextmanager
def read_once():
    """Within this scope each weights file is read from disk once. Building a model from a file asks it in turn
    for the options it records, the variant its weights fix and the weights themselves; a training checkpoint
    carries the optimizer state too, several times the model's size. What a file held is shared by the
    readers (none of them changes it) and dropped when the outermost scope ends; a file rewritten meanwhile is
    read again."""
    global _read_scope
    outer = _read_scope is None
    if outer:
        _read_scope = {}
    try:
        yield
    finally:
        if outer:
            _read_scope = None


def _read_shared(path: str, kind: str, read):
    """``read()`` of the file ``path``, shared within a :func:`read_once` scope."""
    if _read_scope is None:
        return read()
    st = os.stat(path)
    key, stamp = (os.path.realpath(path), kind), (st.st_mtime_ns, st.st_size)
    cached = _read_scope.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    value = read()
    _read_scope[key] = (stamp, value)
    return value


def read_checkpoint_file(path, mapped: bool = True) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU. A pickle holding anything but tensors and plain
    containers is refused (loading it could run code); any other failure, whatever the bytes, is one
    :class:`CheckpointError` too. Within a :func:`read_once` scope the file is loaded once.

    ``mapped``: the file is memory-mapped, privately (nothing is ever written back to it), so a tensor is read when
    it is used and the parts a caller does not need (a training checkpoint's optimizer state, when a model is
    built from it) are never read. For callers that keep the loaded tensors (a resumed optimizer keeps its state
    tensors as loaded) ``mapped=False`` reads the file whole, so no mapping outlives the call. Files in torch's
    pre-1.6 format, which cannot be mapped, are always read whole."""
    path = os.fspath(path)
    _exists(path)
    return _read_shared(path, "pth" if mapped else "pth, whole", lambda: _load_pth(path, mapped))


def _torch_load(path: str, mapped: bool) -> object:
    if mapped:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_pth(path: str, mapped: bool) -> object:
    with warnings.catch_warnings():  # a raw pickle's protocol warning would add lines to the one-line error
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return _torch_load(path, mapped)
        except pickle.UnpicklingError as e:
            detail = str(e)
            name = _GLOBAL.search(detail)
            if name is None:  # random bytes, a truncated file, a plain pickle: unreadable, not shown to be hostile
                raise CheckpointError(
                    f"cannot read checkpoint {path}: it is not a weights-only PyTorch checkpoint (truncated, "
                    f"corrupted, or not written by torch.save: {_last_line(detail)}); use a complete .pth / "
                    f".safetensors file") from None
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled objects other than tensors and plain containers "
                f"({name.group(1)}; loading it could run code). Re-save its state_dict with torch.save, or convert "
                f"it to .safetensors ({_last_line(detail)})") from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            raise CheckpointError(
                f"cannot read checkpoint {path}: the file is truncated or not a PyTorch checkpoint "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}); "
                f"use a complete .pth / .safetensors file") from None
        except Exception as e:  # random bytes trip the weights-only unpickler in many ways (IndexError, KeyError)
            raise CheckpointError(
                f"cannot read checkpoint {path}: the file is corrupted or not a PyTorch checkpoint "
                f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else 'no detail'}); "
                f"use a complete .pth / .safetensors file") from None


# the largest input size accepted from a flag or read from a checkpoint: far above any size these models are trained
# or evaluated at (224, 384); a stored size beyond it is damage, not a setting (10**6 made eval / predict run out
# of memory and export ask for 240 GB)
MAX_INPUT_SIZE = 4096


def _stored_size(value):
    """An input size as stored: 224, [224, 224] or timm's [3, 224, 224] -> (H, W); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = list(value)[-2:] if len(value) in (2, 3) else value
        if len(value) == 1:
            return (value[0], value[0])
        if len(value) == 2:
            return tuple(value)
    return None


def _damaged(path, field, value, rule) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(f"checkpoint {path} is damaged or was not written by spach: its stored {field} {shown} "
                           f"{rule}; use another checkpoint")


def stored_facts(fields: dict, path: str) -> dict:
    """The facts a checkpoint states about itself (its training ``args``, its top-level entries, a safetensors
    file's metadata), checked: ``model``, ``img_size`` (from ``input_size`` / ``img_size``), ``crop_pct``,
    ``num_classes`` (from ``nb_classes`` / ``num_classes``), ``class_names``, ``epoch`` and the
    :data:`ARCH_OPTIONS` it was built with. The file is untrusted
    input: a value out of its range is refused with one :class:`CheckpointError` line, never used (an absurd
    stored input size made eval and predict run out of memory)."""
    out = {}
    model = fields.get("model")
    if model is not None:
        if not (isinstance(model, str) and re.fullmatch(r"[\w.\-]{1,200}", model)):
            raise _damaged(path, "model", model, "is not a model name")
        out["model"] = model
    for key in ("input_size", "img_size"):
        if fields.get(key) is not None:
            size = _stored_size(fields[key])
            if size is None or not all(1 <= v <= MAX_INPUT_SIZE for v in size):
                raise _damaged(path, key, fields[key], f"is not an input size in 1..{MAX_INPUT_SIZE}")
            out.setdefault("img_size", size)
    crop = fields.get("crop_pct")
    if crop is not None:
        if not (isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop <= 1):
            raise _damaged(path, "crop_pct", crop, "is not a fraction in (0, 1]")
        out["crop_pct"] = float(crop)
    for key in ("nb_classes", "num_classes"):
        n = fields.get(key)
        if n is not None:
            if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10 ** 6):
                raise _damaged(path, key, n, "is not a class count in 1..1000000")
            out.setdefault("num_classes", n)
    names = fields.get("class_names")
    if names is not None:
        if not (isinstance(names, (list, tuple)) and 1 <= len(names) <= 10 ** 6
                and all(isinstance(c, str) and len(c) <= 1000 for c in names)):
            raise _damaged(path, "class_names", names, "is not a list of class names")
        out["class_names"] = list(names)
    for key in ARCH_OPTIONS:
        value = fields.get(key)
        if value is None or value is False:
            continue
        if not (value is True or isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_]{1,32}", value)):
            raise _damaged(path, key, value, "is not a model option")
        out[key] = value  # the model refuses a value it does not take, with the choices
    epoch = fields.get("epoch")
    if epoch is not None:
        if not (isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch < 10 ** 7):
            raise _damaged(path, "epoch", epoch, "is not an epoch number")
        out["epoch"] = epoch
    return out


def stored_model_options(path: str, checkpoint=None) -> dict:
    """The model name and :data:`ARCH_OPTIONS` a file records: a training checkpoint's ``args``, a safetensors
    file's metadata (checked by :func:`stored_facts`); empty for files that record none (official releases).
    ``checkpoint``: the ``.pth`` file's contents when the caller has read them already."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        fields = safetensors_metadata(path)
    else:
        ckpt = read_checkpoint_file(path) if checkpoint is None else checkpoint
        fields = ckpt.get("args") if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) else {}
    return stored_facts({k: fields.get(k) for k in ("model", *ARCH_OPTIONS)}, path)


def unwrap_state_dict(ckpt: dict, use_ema: bool = False, path: str = "checkpoint") -> dict:
    """The state_dict inside a loaded checkpoint: ``ckpt['model']`` (official releases, our training
    checkpoints), ``['state_dict']`` or ``['module']``, else ``['model_ema']`` / ``['state_dict_ema']``, else
    ``ckpt`` itself (a bare state_dict). With ``use_ema`` the EMA entries come first, and a checkpoint that
    wraps its weights without EMA ones is refused."""
    if use_ema and not any(isinstance(ckpt.get(k), dict) for k in EMA_KEYS):
        # (a training checkpoint of a run without EMA stores model_ema=None: that is no EMA weights either)
        raise CheckpointError(f"checkpoint {path} has no EMA weights (it was trained without --model-ema): "
                              f"drop --ema / --use-ema to use its plain weights")
    keys = EMA_KEYS + WRAPPER_KEYS if use_ema else WRAPPER_KEYS + EMA_KEYS
    for key in keys:
        if key in ckpt and isinstance(ckpt[key], dict):
            if use_ema and key in WRAPPER_KEYS and any(k in ckpt for k in EMA_KEYS):
                continue
            if use_ema and key not in EMA_KEYS:
                raise CheckpointError(f"checkpoint {path} has no EMA weights ('model_ema'): load it without use_ema")
            return ckpt[key]
    return ckpt


def strip_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state_dict`` with the DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes removed."""
    out = {}
    for k, v in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            if isinstance(k, str) and k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def read_state_dict(path, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors of the weights file at ``path``: ``.safetensors``, or a ``.pth`` holding ``{'model': sd}``,
    ``{'model_ema': sd}``, ``{'state_dict': sd}`` or a bare state_dict (see :func:`unwrap_state_dict`).
    Keys are as stored (prefixes included)."""
    path = os.fspath(path)
    _exists(path)
    if path.endswith(".safetensors"):
        if use_ema:  # one set of weights per file: --use-ema would silently give the plain ones
            raise CheckpointError(f"{path} holds one set of weights (safetensors files carry no EMA copy): drop "
                                  f"--ema / --use-ema (export the EMA weights with spach export --use-ema)")
        return dict(_read_shared(path, "safetensors", lambda: _load_safetensors(path)))
    return state_dict_of(read_checkpoint_file(path), path, use_ema)


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None


def state_dict_of(ckpt, path, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` file's contents ``ckpt`` (read from ``path``), as :func:`read_state_dict`."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state_dict: save "
                              f"model.state_dict() (or {{'model': model.state_dict()}})")
    ckpt = unwrap_state_dict(ckpt, use_ema, path)
    tensors = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} contains no tensors (keys: {sorted(ckpt)[:8]}): "
                              f"it is not a weights file")
    return tensors


def safetensors_metadata(path) -> dict:
    """The string metadata of a ``.safetensors`` file (``spach export`` writes the model's config there as JSON
    strings), JSON values decoded where they decode."""
    path = os.fspath(path)
    _exists(path)
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def safetensors_shape(path, key: str) -> Optional[Tuple[int, ...]]:
    """The shape of tensor ``key`` in a ``.safetensors`` file, read from its header (None if it has no such
    tensor or cannot be read; reading its weights reports why)."""
    try:
        from safetensors import safe_open
        with safe_open(os.fspath(path), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape()) if key in f.keys() else None
    except Exception:  # safetensors raises its own error types
        return None


def is_url(path) -> bool:
    return isinstance(path, str) and path.lower().startswith(URL_SCHEMES)


def url_file_name(url: str) -> str:
    """The file name a URL ends in (``''`` if it names none): what the downloaded copy is called."""
    return os.path.basename(urllib.parse.urlparse(url).path)


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
    file_name = url_file_name(path)
    if not file_name:
        raise CheckpointError(f"{path} does not name a weights file: pass the URL of a .pth / .safetensors file")
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", f"url-{key}", file_name)
    return _download(path, cached, "pass its local path instead of the URL")


def release_file(url: str, hint: str, what: str = "") -> str:
    """The official release file at ``url``, from torch hub's own place for it (``<hub>/checkpoints/<name>``),
    downloaded there if missing. A failed download names ``url``, ``what`` it is and the ``hint``."""
    return _download(url, os.path.join(torch.hub.get_dir(), "checkpoints", url_file_name(url)), hint, what)
