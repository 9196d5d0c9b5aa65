"""The one reader of weights files: training checkpoints, official release files, bare state_dicts, safetensors.

A checkpoint is untrusted input: ``.pth`` files are read with ``torch.load(weights_only=True)`` (no code in a
pickle can run) and ``.safetensors`` with :mod:`safetensors`. Every way a file can fail to read (missing,
truncated, random bytes, a pickle holding code) is one :class:`~spach.errors.CheckpointError` line naming the
file and the fix, whichever command reads it.

Weights may also be given as URLs, as the original's ``--resume https://...``: :func:`local_weights` turns an
http(s) URL into a file downloaded once into torch hub's cache, and a file:// URL into its path. A model folder in
timm's Hugging Face layout (``config.json`` + ``model.safetensors``, as ``spach export --format hf`` writes it) and
an ``hf-hub:ORG/NAME`` id (that folder on the Hugging Face Hub, fetched into huggingface_hub's cache) are read too.

:func:`open_weights` is the way in: it reads a file once and gives a :class:`WeightsFile` holding its checked facts,
its training flags and (when asked) its tensors, which every model builder takes in place of a path.
"""
import hashlib
import json
import os
import pickle
import re
import urllib.parse
import urllib.request
import warnings
from typing import Dict, Optional, Tuple

import torch

from .errors import CheckpointError
from .files import regular_file_problem

__all__ = ["WeightsFile", "open_weights", "read_checkpoint_file", "stored_facts", "unwrap_state_dict", "strip_prefixes",
           "read_state_dict", "safetensors_metadata", "safetensors_shape", "is_url", "is_hf_hub", "url_file_name",
           "local_weights", "release_file", "ARCH_OPTIONS", "arch_options", "register_arch_options", "state_dict_of",
           "hf_hub_folder", "HF_CONFIG", "HF_WEIGHTS", "HF_PREFIX", "HF_INSTALL"]

# architecture options a file may record beside its weights (a training run's flags, an export's metadata). Each
# model family declares its own; spach.models registers their union here when it is imported (this module sits
# below the models and never imports them). ``ARCH_OPTIONS`` reads the registered names.
_arch_options: Tuple[str, ...] = ()


def register_arch_options(names) -> None:
    """Add option names that :func:`stored_facts` checks and keeps (the model families' recorded options)."""
    global _arch_options
    _arch_options = tuple(dict.fromkeys((*_arch_options, *names)))


def arch_options() -> Tuple[str, ...]:
    """The architecture option names every model family records beside its weights (registered by spach.models)."""
    return _arch_options


def __getattr__(name):
    if name == "ARCH_OPTIONS":  # derived from the families, as registered: never a list written out here
        return _arch_options
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# timm's Hugging Face model folder: the config it reads (`local-dir:` / `hf-hub:`) and the weights file names,
# safetensors first (timm's own order)
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_PREFIX = "hf-hub:"
HF_INSTALL = "pip install 'spach[hf]'"

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


def read_checkpoint_file(path, mapped: bool = True) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU. A pickle holding anything but tensors and plain
    containers is refused (loading it could run code); any other failure, whatever the bytes, is one
    :class:`CheckpointError` too. A file that is asked several things is opened once, as a :class:`WeightsFile`.

    ``mapped``: the file is memory-mapped, privately (nothing is ever written back to it), so a tensor is read when
    it is used and the parts a caller does not need (a training checkpoint's optimizer state, when a model is
    built from it) are never read. For callers that keep the loaded tensors (a resumed optimizer keeps its state
    tensors as loaded) ``mapped=False`` reads the file whole, so no mapping outlives the call. Files in torch's
    pre-1.6 format, which cannot be mapped, are always read whole."""
    path = os.fspath(path)
    _exists(path)
    return _load_pth(path, mapped)


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
    architecture options (:func:`arch_options`) it was built with. The file is untrusted
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
    for key in _arch_options:
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
    ``{'model_ema': sd}``, ``{'state_dict': sd}`` or a bare state_dict (see :func:`unwrap_state_dict`); a model
    folder's or ``hf-hub:`` id's weights file. Keys are as stored (prefixes included)."""
    path = local_weights(os.fspath(path))
    _exists(path)
    if path.endswith(".safetensors"):
        if use_ema:  # one set of weights per file: --use-ema would silently give the plain ones
            raise CheckpointError(f"{path} holds one set of weights (safetensors files carry no EMA copy): drop "
                                  f"--ema / --use-ema (export the EMA weights with spach export --use-ema)")
        return dict(_load_safetensors(path))
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


def is_hf_hub(path) -> bool:
    """Whether ``path`` is an ``hf-hub:ORG/NAME[@REVISION]`` id (timm's spelling of a Hugging Face model repo)."""
    return isinstance(path, str) and path.startswith(HF_PREFIX)


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
    own per URL (two runs' ``best.pth`` never stand in for each other); for a model folder or an ``hf-hub:`` id,
    the weights file in it (``model.safetensors``, which ``spach export --format hf`` writes with the model's
    facts as metadata)."""
    if is_hf_hub(path):
        return _folder_weights(hf_hub_folder(path))
    if isinstance(path, str) and os.path.isdir(path):
        return _folder_weights(path)
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


# --- model folders and the Hugging Face Hub ---------------------------------------------------------------
# a config.json larger than this is not a model's config (a million class names fit in a few tens of MB)
MAX_CONFIG_BYTES = 256 * 2 ** 20


def _folder_weights(folder: str) -> str:
    """The weights file of a model folder (``model.safetensors``, else ``pytorch_model.bin``)."""
    for name in HF_WEIGHTS:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise CheckpointError(f"checkpoint {folder} is a folder without {' or '.join(HF_WEIGHTS)}: pass a weights file "
                          f"(.pth / .safetensors), or a model folder written by spach export --format hf")


def hf_hub_folder(model_id: str) -> str:
    """The local folder holding ``config.json`` and the weights of the Hugging Face model repo named by
    ``hf-hub:ORG/NAME[@REVISION]``: huggingface_hub's cache snapshot, fetched there if missing (with
    ``HF_HUB_OFFLINE=1`` only the cache is read)."""
    repo = model_id[len(HF_PREFIX):] if is_hf_hub(model_id) else model_id
    repo, _, revision = repo.partition("@")
    if not re.fullmatch(r"[\w.\-]{1,96}/[\w.\-]{1,96}", repo):
        raise CheckpointError(f"{model_id} is not a Hugging Face model id: write hf-hub:ORG/NAME (or "
                              f"hf-hub:ORG/NAME@REVISION)")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(f"{model_id} is read with huggingface_hub, which is not installed: "
                              f"{HF_INSTALL}") from None

    def fetch(name):
        return hf_hub_download(repo, name, revision=revision or None, library_name="spach")

    try:
        config = fetch(HF_CONFIG)
        for i, name in enumerate(HF_WEIGHTS):
            try:
                fetch(name)
                break
            except Exception:  # the next name (huggingface_hub raises its own error types)
                if i == len(HF_WEIGHTS) - 1:
                    raise
    except Exception as e:  # no network, no such repo or revision, not in the offline cache ...
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else "no detail"
        raise CheckpointError(f"cannot get {model_id} from the Hugging Face Hub ({type(e).__name__}: {detail}): "
                              f"check the id and the network (HF_HUB_OFFLINE=1 reads only the local cache), or "
                              f"pass the model's local folder") from None
    return os.path.dirname(config)


def _read_config(folder: str) -> Tuple[str, dict]:
    """The path and the JSON object of a model folder's ``config.json`` (untrusted: any failure is one line)."""
    from .files import open_regular
    path = os.path.join(folder, HF_CONFIG)
    problem = regular_file_problem(path)
    if problem:
        what = f"without {HF_CONFIG}" if problem == "does not exist" else f"whose {HF_CONFIG} {problem}"
        raise CheckpointError(f"checkpoint {folder} is a folder {what}: pass a weights file (.pth / .safetensors), "
                              f"or a model folder written by spach export --format hf")
    try:
        with open_regular(path) as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES // 2 ** 20} MB")
        config = json.loads(text)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {str(e)[:160]}): the folder is damaged; "
                              f"export it again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not a model config: export the folder again")
    return path, config


def _config_fields(config: dict) -> dict:
    """A timm model config's facts under :func:`stored_facts`' names. timm keeps them at the top level
    (``architecture``, ``num_classes``, ``label_names``), in ``model_args`` (the constructor's) and in
    ``pretrained_cfg`` (``input_size``, ``crop_pct``); older configs are one flat dict."""
    pretrained = config.get("pretrained_cfg")
    pretrained = pretrained if isinstance(pretrained, dict) else config
    args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    fields = {"model": config.get("architecture", pretrained.get("architecture")),
              "num_classes": config.get("num_classes", pretrained.get("num_classes")),
              "class_names": config.get("label_names", pretrained.get("label_names")),
              "img_size": args.get("img_size", pretrained.get("input_size")),
              "crop_pct": pretrained.get("crop_pct")}
    fields.update({k: args.get(k) for k in _arch_options})
    return fields


class WeightsFile:
    """A weights file opened once: what it says about itself, checked, and its tensors, read when asked.

    Open one with :func:`open_weights` (a ``.pth`` training checkpoint, an official release, a bare state_dict, a
    ``.safetensors`` export, a model folder, an ``hf-hub:`` id or an http(s) URL) and hand it to whatever builds
    or loads a model (``spach.create_model(checkpoint_path=...)``, ``spach.models.load_pretrained``,
    ``spach.models.arch_from_checkpoint``): none of them reads the file again.

    * ``source``: what was named (shown in messages); ``path``: the local file the tensors are in;
    * ``facts``: what the file states about itself, checked by :func:`stored_facts` (untrusted input: a value out
      of range was refused when the file was opened): any of ``model``, ``img_size`` (H, W), ``crop_pct``,
      ``num_classes`` (as recorded; the classifier's rows, :meth:`tensor_shape`, are the better witness),
      ``class_names``, ``epoch`` and the architecture options (:meth:`options`);
    * ``args``: a training checkpoint's flags (a plain dict; its values were checked as ``facts`` are), else None;
    * ``contents``: a ``.pth`` file's top-level entries (memory-mapped: a training checkpoint's ``max_accuracy``,
      ``log_stats``, its optimizer state is never read unless used), else None;
    * ``config``: a model folder's ``config.json``, else None.
    """

    def __init__(self, source: str, path: str, facts: dict, args: Optional[dict] = None, contents=None,
                 config: Optional[dict] = None):
        self.source, self.path, self.facts, self.args = source, path, facts, args
        self.contents, self.config = contents, config
        self._tensors: Dict[bool, Dict[str, torch.Tensor]] = {}

    @property
    def is_safetensors(self) -> bool:
        return self.path.endswith(".safetensors")

    def options(self) -> dict:
        """The architecture options the file records (a training run's ``--stem-type``, ``--act-layer`` ...)."""
        return {k: self.facts[k] for k in _arch_options if k in self.facts}

    def state_dict(self, use_ema: bool = False) -> Dict[str, torch.Tensor]:
        """The tensors (keys as stored, prefixes included; see :func:`unwrap_state_dict`), read once per choice of
        ``use_ema``. A file without EMA weights refuses ``use_ema`` with one line."""
        if use_ema not in self._tensors:
            if self.is_safetensors:
                if use_ema:  # one set of weights per file: --use-ema would silently give the plain ones
                    raise CheckpointError(
                        f"{self.source} holds one set of weights (safetensors files carry no EMA copy): drop --ema / "
                        f"--use-ema (export the EMA weights with spach export --use-ema)")
                self._tensors[use_ema] = dict(_load_safetensors(self.path))
            else:
                self._tensors[use_ema] = state_dict_of(self.contents, self.source, use_ema)
        return self._tensors[use_ema]

    def tensor_shape(self, key: str, use_ema: bool = False) -> Optional[Tuple[int, ...]]:
        """The shape of tensor ``key`` (wrapper prefixes ignored), None if the file has no such tensor; a
        safetensors file answers from its header, without reading its weights."""
        if self.is_safetensors and not self._tensors:
            return safetensors_shape(self.path, key)
        tensor = strip_prefixes(self.state_dict(use_ema)).get(key)
        return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None

    def __repr__(self):
        return f"WeightsFile({self.source!r}, model={self.facts.get('model')!r})"


def open_weights(source, mapped: bool = True) -> WeightsFile:
    """Open a weights file once (see :class:`WeightsFile`); an opened one is returned as it is. ``source``: a
    ``.pth`` / ``.safetensors`` path, a model folder (``config.json`` + ``model.safetensors``), an
    ``hf-hub:ORG/NAME[@REVISION]`` id or an http(s) / file URL. Every failure (missing, unreadable, hostile,
    damaged facts, no huggingface_hub for an ``hf-hub:`` id) is one :class:`CheckpointError` line.
    ``mapped``: as :func:`read_checkpoint_file` (``False`` for a caller that keeps the tensors it loads)."""
    if isinstance(source, WeightsFile):
        return source
    source = os.fspath(source)
    folder = hf_hub_folder(source) if is_hf_hub(source) else source if os.path.isdir(source) else None
    if folder is not None:
        config_path, config = _read_config(folder)
        facts = stored_facts(_config_fields(config), config_path)
        path = _folder_weights(folder)
        contents = None if path.endswith(".safetensors") else read_checkpoint_file(path, mapped)
        return WeightsFile(source, path, facts, contents=contents, config=config)
    path = local_weights(source)
    _exists(path)
    if path.endswith(".safetensors"):
        metadata = safetensors_metadata(path)
        keys = ("model", "img_size", "num_classes", "class_names", "crop_pct", *_arch_options)
        return WeightsFile(source, path, stored_facts({k: metadata.get(k) for k in keys}, path))
    contents = read_checkpoint_file(path, mapped)
    if not isinstance(contents, dict):  # state_dict() says what is wrong with it when the weights are asked for
        return WeightsFile(source, path, {}, contents=contents)
    args = contents.get("args") if isinstance(contents.get("args"), dict) else None
    facts = stored_facts(args or {}, path)
    facts.update(stored_facts({"class_names": contents.get("class_names"), "epoch": contents.get("epoch")}, path))
    return WeightsFile(source, path, facts, args=args, contents=contents)
