"""spach: SPACH networks (CNN / Transformer / MLP mixing blocks) and the system that trains them."""
__version__ = "0.1.0"

from .errors import CheckpointError, DataError, SpachError
from .models import (MODEL_CONFIGS, Spach, SpachMS, count_flops, count_params, create_model, list_models,
                     load_pretrained, model_config)

__all__ = ["create_model", "list_models", "load_pretrained", "count_flops", "count_params", "Spach", "SpachMS",
           "MODEL_CONFIGS", "model_config", "SpachError", "DataError", "CheckpointError", "__version__"]
