"""spach: SPACH networks (CNN / Transformer / MLP mixing blocks) and the system that trains them."""
__version__ = "0.1.0"

import warnings as _warnings

# timm < 1.0.31 applies torch.jit.interface at import, which recent torch flags as deprecated on every start-up;
# the warning concerns timm's code, and on the command line it would be a second line around one-line errors.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)

from .errors import CheckpointError, DataError, SpachError
from .models import (MODEL_CONFIGS, Spach, SpachMS, count_flops, count_params, create_model, list_models,
                     load_pretrained, model_config)

__all__ = ["create_model", "list_models", "load_pretrained", "count_flops", "count_params", "Spach", "SpachMS",
           "MODEL_CONFIGS", "model_config", "SpachError", "DataError", "CheckpointError", "__version__"]
