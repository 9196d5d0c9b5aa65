"""spach: SPACH networks (CNN / Transformer / MLP mixing blocks), the other families of the original repository
(sMLPNet, ShiftViT), and the system that trains them.

``import spach`` registers every model with timm, so that ``timm.create_model(name)`` works after it (the promise
timm users rely on); that import is what pulls in torch and timm.
"""
import warnings as _warnings

from .errors import CheckpointError, DataError, SpachError

__version__ = "0.1.0"

with _warnings.catch_warnings():
    # timm < 1.0.31 applies torch.jit.interface at import, which recent torch flags as deprecated: timm's code, not
    # the caller's, so it is silenced for this import only (no filter is left installed)
    _warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)
    from .models import (MODEL_CONFIGS, Spach, SpachMS, count_flops, count_params, create_model, list_models,
                         load_pretrained, model_config)

__all__ = ["create_model", "list_models", "load_pretrained", "count_flops", "count_params", "Spach", "SpachMS",
           "MODEL_CONFIGS", "model_config", "SpachError", "DataError", "CheckpointError", "__version__"]
