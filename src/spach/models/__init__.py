"""SPACH models (architecture only: torch + timm layers, nothing from the training system).

Importing this package registers every variant of every family with timm. ``base`` holds what the families
share (the timm model API, the config table, timm registration), ``flops`` the FLOPs count; each family module
(``spach``, ``smlp``, ``shiftvit``) holds its blocks, its network and its table.
"""
import timm as _timm

from ..errors import CheckpointError, SpachError
from ..weights import read_checkpoint_file, read_once, read_state_dict, state_dict_of, stored_model_options
from .flops import count_flops, count_params
from .pretrained import checkpoint_filter_fn, file_model_kwargs, load_pretrained
from .spach import MixingBlock, Spach, SpachMS  # registers the SPACH family (first: `spach models` lists it first)
from .smlp import SMLPNet  # registers the sMLPNet family
from .shiftvit import SHIFTVIT_CONFIGS, ShiftViT  # noqa: I001 - registers the ShiftViT family
from .shiftvit import VARIANT_OPTIONS as _SHIFTVIT_VARIANTS
from .shiftvit import checkpoint_model_kwargs as _shiftvit_checkpoint_kwargs
from .variants import (MODEL_CONFIGS, default_drop_path_rate, list_models, model_config,
                       unknown_model_message)

__all__ = ["create_model", "list_models", "load_pretrained", "read_state_dict", "checkpoint_filter_fn",
           "MixingBlock", "Spach", "SpachMS", "SMLPNet", "ShiftViT", "MODEL_CONFIGS", "model_config", "count_flops",
           "count_params", "UnknownModelError", "default_drop_path_rate", "arch_from_checkpoint",
           "variant_options", "variant_choices"]


class UnknownModelError(SpachError, KeyError):
    """An unknown model name (the message suggests close names)."""

    def __str__(self):
        return self.args[0]


def create_model(model_name: str, pretrained: bool = False, checkpoint_path: str = None, use_ema: bool = False,
                 **kwargs):
    """Build a model by name (timm keyword arguments: ``num_classes``, ``drop_path_rate``,
    ``img_size``, ``features_only`` ...). ``checkpoint_path`` loads a local file (official release
    ``.pth``, training checkpoint, bare state_dict or ``.safetensors``) with strict key/shape checks; unless given,
    ``num_classes`` and ``img_size`` are the file's (its classifier rows, a training run's input size, an export's
    metadata)."""
    if model_name not in MODEL_CONFIGS:
        raise UnknownModelError(unknown_model_message(model_name))
    if not checkpoint_path:
        return _timm.create_model(model_name, pretrained=pretrained, **kwargs)
    with read_once():  # the file is asked for its shape, its options, its variant and its weights: read once
        for key, value in file_model_kwargs(model_name, checkpoint_path, use_ema).items():
            kwargs.setdefault(key, value)  # explicit arguments win over what the file fixes
        arch_from_checkpoint(model_name, checkpoint_path, use_ema, kwargs)
        model = _timm.create_model(model_name, pretrained=pretrained, **kwargs)
        pruned = kwargs.get("features_only") or kwargs.get("num_classes", 1) == 0
        load_pretrained(model, checkpoint_path, use_ema=use_ema, strict=not pruned)
    return model


# families whose architecture has a variant that only the weights tell apart: name -> reader of the file's
# state_dict giving the architecture arguments it fixes
_CHECKPOINT_ARCH = {name: _shiftvit_checkpoint_kwargs for name in SHIFTVIT_CONFIGS}
_VARIANTS = {name: _SHIFTVIT_VARIANTS for name in SHIFTVIT_CONFIGS}


def variant_options(model_name: str) -> dict:
    """The string options that choose a variant of ``model_name``: name -> (default, choices) (ShiftViT's
    ``norm_layer`` and ``act_layer``); empty for models that have none."""
    return dict(_VARIANTS.get(model_name, {}))


def variant_choices(option: str) -> tuple:
    """Every value a variant option (``norm_layer``, ``act_layer``) takes in some family: a command line's choices."""
    return tuple(dict.fromkeys(c for options in _VARIANTS.values() if option in options for c in options[option][1]))


def arch_from_checkpoint(model_name, path, use_ema, kwargs, spell=None):
    """Fill ``kwargs`` with the architecture arguments the weights file fixes: the options it records for this
    model (a training run's ``--stem-type``, ``--act-layer`` ...; an export's metadata) and what its weights tell
    (ShiftViT: GroupNorm or BatchNorm). An explicit argument that contradicts the file stops here with the fix.
    ``spell(key, value)`` names an argument in the message, ``spell(key, None)`` the argument alone (a
    command-line flag, say); by default ``key=value`` and ``key``."""
    spell = spell or (lambda key, value: key if value is None else f"{key}={value!r}")
    safetensors = str(path).endswith(".safetensors")
    ckpt = None if safetensors else read_checkpoint_file(path)
    stored = stored_model_options(path, ckpt)
    found = {k: v for k, v in stored.items() if k != "model"} if stored.get("model") in (None, model_name) else {}
    if model_name in _CHECKPOINT_ARCH:
        weights = read_state_dict(path, use_ema=use_ema) if safetensors else state_dict_of(ckpt, path, use_ema)
        found.update(_CHECKPOINT_ARCH[model_name](weights))
    for key, value in found.items():
        asked = kwargs.setdefault(key, value)
        if isinstance(asked, (str, bool)) and asked != value:  # (timm may pass a layer class: left to it)
            raise CheckpointError(f"checkpoint {path} was trained with {spell(key, value)} but {model_name} was asked "
                                  f"for {spell(key, asked)}: use {spell(key, value)} (or leave {spell(key, None)} out)")
