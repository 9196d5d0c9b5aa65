"""Model EMA: timm's ``ModelEmaV3`` with every tensor averaged once per step, also when modules are shared.

With ``--shared-spatial-func`` one spatial mixer serves every block of a stage, and ``state_dict()`` lists its
tensors once per block (the original checkpoint layout). timm's EMA walks ``state_dict().values()`` and would lerp
a shared tensor once per listing, i.e. with decay ``d ** depth`` instead of ``d``. Here each storage is updated once.
"""
from typing import List, Tuple

import torch
from timm.utils import ModelEmaV3

__all__ = ["ModelEma"]


def _unique_pairs(ema_module, model) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    seen = set()
    ema_out, model_out = [], []
    for ema_v, model_v in zip(ema_module.state_dict().values(), model.state_dict().values()):
        key = (ema_v.data_ptr(), tuple(ema_v.shape))
        if key in seen:
            continue
        seen.add(key)
        ema_out.append(ema_v)
        model_out.append(model_v)
    return ema_out, model_out


class ModelEma(ModelEmaV3):
    @torch.no_grad()
    def apply_update_(self, model, decay: float):
        weight = 1.0 - decay
        ema_values, model_values = _unique_pairs(self.module, model)
        lerp_ema, lerp_model = [], []
        for ema_v, model_v in zip(ema_values, model_values):
            if not ema_v.is_floating_point():
                ema_v.copy_(model_v.to(device=ema_v.device))
            elif self.foreach and model_v.device == ema_v.device:
                lerp_ema.append(ema_v)
                lerp_model.append(model_v.to(dtype=ema_v.dtype))
            else:
                ema_v.lerp_(model_v.to(device=ema_v.device, dtype=ema_v.dtype), weight=weight)
        if lerp_ema:
            torch._foreach_lerp_(lerp_ema, lerp_model, weight=weight)
