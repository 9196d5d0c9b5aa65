"""The index of every registered model name: listing, architecture lookup and close-name suggestions.

The names and their architectures live in each family's table (``spach.SPACH_CONFIGS``), registered into
:data:`spach.models.base.MODEL_CONFIGS`; this module only reads them.
"""
import difflib
from typing import List, Optional

from .base import META_KEYS, MODEL_CONFIGS

__all__ = ["MODEL_CONFIGS", "list_models", "model_config", "suggest_model_names", "unknown_model_message",
           "default_drop_path_rate"]


def model_config(name: str) -> dict:
    """Architecture keyword arguments of a named model (published metadata stripped)."""
    if name not in MODEL_CONFIGS:
        raise KeyError(unknown_model_message(name))
    return {k: v for k, v in MODEL_CONFIGS[name].items() if k not in META_KEYS}


def default_drop_path_rate(name: str) -> Optional[float]:
    """The stochastic-depth rate ``name`` trains with by default: its table's ``drop_path_rate``, the rate its
    original registry trained it with (sMLPNet, ShiftViT), or ``None`` where the recipe's ``--drop-path``
    default applies (SPACH)."""
    if name not in MODEL_CONFIGS:
        raise KeyError(unknown_model_message(name))
    return MODEL_CONFIGS[name].get("drop_path_rate")


def list_models() -> List[str]:
    return list(MODEL_CONFIGS)


def suggest_model_names(name: str, n: int = 3) -> List[str]:
    return difflib.get_close_matches(name, list(MODEL_CONFIGS), n=n, cutoff=0.5)


def unknown_model_message(name: str) -> str:
    close = suggest_model_names(name)
    hint = f"did you mean {', '.join(close)}?" if close else "run `spach models` for the list"
    return f"unknown model {name!r}: {hint}"
