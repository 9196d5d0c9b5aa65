"""SPACH models (architecture only: torch + timm layers, nothing from the training system).

Importing this package registers every variant of every family with timm. ``base`` holds what the families
share (the timm model API, the config table, timm registration), ``flops`` the FLOPs count; each family module
(``spach``, ``smlp``, ``shiftvit``) holds its blocks, its network and its table.
"""
import timm as _timm

from ..errors import CheckpointError, SpachError
from ..weights import WeightsFile, open_weights, read_state_dict, register_arch_options
from .base import FAMILY_OPTIONS
from .flops import count_flops, count_params
from .pretrained import checkpoint_filter_fn, file_model_kwargs, load_pretrained
from .spach import MixingBlock, Spach, SpachMS  # registers the SPACH family (first: `spach models` lists it first)
from .smlp import SMLPNet  # registers the sMLPNet family
from .shiftvit import ShiftViT  # registers the ShiftViT family
from .variants import (MODEL_CONFIGS, default_drop_path_rate, list_models, model_config,
                       unknown_model_message)

__all__ = ["create_model", "list_models", "load_pretrained", "read_state_dict", "checkpoint_filter_fn",
           "MixingBlock", "Spach", "SpachMS", "SMLPNet", "ShiftViT", "MODEL_CONFIGS", "model_config", "count_flops",
           "count_params", "UnknownModelError", "default_drop_path_rate", "arch_from_checkpoint",
           "variant_options", "variant_choices", "arch_options", "open_weights", "WeightsFile"]

# timm's spellings of a model that names its own weights: a Hugging Face repo, a local model folder
_SOURCES = ("hf-hub:", "local-dir:")


class UnknownModelError(SpachError, KeyError):
    """An unknown model name (the message suggests close names)."""

    def __str__(self):
        return self.args[0]


def arch_options() -> tuple:
    """Every architecture option some family records beside its weights (SPACH's ``stem_type`` and
    ``shared_spatial_func``, ShiftViT's ``norm_layer`` and ``act_layer``): what a weights file may state."""
    return tuple(dict.fromkeys(name for options in FAMILY_OPTIONS.values() for name in options.recorded))


register_arch_options(arch_options())  # so the weights reader checks and keeps them (it cannot import models)


def create_model(model_name: str, pretrained: bool = False, checkpoint_path=None, use_ema: bool = False,
                 **kwargs):
    """Build a model by name (timm keyword arguments: ``num_classes``, ``drop_path_rate``,
    ``img_size``, ``features_only`` ...). ``checkpoint_path`` loads weights with strict key/shape checks: an
    official release ``.pth``, a training checkpoint, a bare state_dict, a ``.safetensors`` file, a model folder
    (``spach export --format hf``), an ``hf-hub:ORG/NAME`` id, a URL, or a :class:`~spach.weights.WeightsFile`
    already opened. Unless given, ``num_classes`` and ``img_size`` are the file's (its classifier rows, a training
    run's input size, an export's metadata). As in timm, ``model_name`` may be ``'hf-hub:ORG/NAME'`` or
    ``'local-dir:FOLDER'``: the model that folder holds, with its weights."""
    if isinstance(model_name, str) and model_name.startswith(_SOURCES):
        checkpoint_path = open_weights(model_name if model_name.startswith("hf-hub:") else model_name[10:])
        model_name = checkpoint_path.facts.get("model")
        if model_name is None:
            raise CheckpointError(f"{checkpoint_path.source} does not name its model: pass the model name and "
                                  f"checkpoint_path={checkpoint_path.source!r}")
    if model_name not in MODEL_CONFIGS:
        raise UnknownModelError(unknown_model_message(model_name))
    if not checkpoint_path:
        return _timm.create_model(model_name, pretrained=pretrained, **kwargs)
    weights = open_weights(checkpoint_path)  # asked for its shape, its options, its variant and its weights: read once
    for key, value in file_model_kwargs(model_name, weights, use_ema).items():
        kwargs.setdefault(key, value)  # explicit arguments win over what the file fixes
    arch_from_checkpoint(model_name, weights, use_ema, kwargs)
    model = _timm.create_model(model_name, pretrained=pretrained, **kwargs)
    pruned = kwargs.get("features_only") or kwargs.get("num_classes", 1) == 0
    load_pretrained(model, weights, use_ema=use_ema, strict=not pruned)
    return model


def variant_options(model_name: str) -> dict:
    """The string options that choose a variant of ``model_name``: name -> (default, choices) (ShiftViT's
    ``norm_layer`` and ``act_layer``); empty for models that have none."""
    options = FAMILY_OPTIONS.get(model_name)
    return dict(options.variants) if options else {}


def variant_choices(option: str) -> tuple:
    """Every value a variant option (``norm_layer``, ``act_layer``) takes in some family: a command line's choices."""
    return tuple(dict.fromkeys(c for options in FAMILY_OPTIONS.values()
                               for c in options.variants.get(option, (None, ()))[1]))


def arch_from_checkpoint(model_name, weights, use_ema, kwargs, spell=None):
    """Fill ``kwargs`` with the architecture arguments the weights fix (``weights``: a path or an opened
    :class:`~spach.weights.WeightsFile`): the options the file records for this model (a training run's
    ``--stem-type``, ``--act-layer`` ...; an export's metadata) and what its tensors tell (ShiftViT: GroupNorm or
    BatchNorm). An explicit argument that contradicts the file stops here with the fix. ``spell(key, value)``
    names an argument in the message, ``spell(key, None)`` the argument alone (a command-line flag, say); by
    default ``key=value`` and ``key``."""
    spell = spell or (lambda key, value: key if value is None else f"{key}={value!r}")
    weights = open_weights(weights)
    found = weights.options() if weights.facts.get("model") in (None, model_name) else {}
    family = FAMILY_OPTIONS.get(model_name)
    if family is not None and family.from_weights is not None:
        found.update(family.from_weights(weights.state_dict(use_ema)))
    for key, value in found.items():
        asked = kwargs.setdefault(key, value)
        if isinstance(asked, (str, bool)) and asked != value:  # (timm may pass a layer class: left to it)
            raise CheckpointError(f"checkpoint {weights.source} was trained with {spell(key, value)} but {model_name} "
                                  f"was asked for {spell(key, asked)}: use {spell(key, value)} (or leave "
                                  f"{spell(key, None)} out)")
