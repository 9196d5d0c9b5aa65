"""spach: SPACH networks (CNN / Transformer / MLP mixing blocks) and the system that trains them.

The model API below is imported on first use (``spach.create_model`` ...), so that ``import spach`` (and
``spach --help``) does not pay for torch and timm.
"""
import importlib as _importlib

from .errors import CheckpointError, DataError, SpachError

__version__ = "0.1.0"

_MODEL_API = ("create_model", "list_models", "load_pretrained", "count_flops", "count_params", "Spach", "SpachMS",
              "MODEL_CONFIGS", "model_config")

__all__ = [*_MODEL_API, "SpachError", "DataError", "CheckpointError", "__version__"]


def __getattr__(name):
    if name in _MODEL_API:
        value = getattr(_importlib.import_module(".models", __name__), name)
        globals()[name] = value
        return value
    try:
        return _importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
