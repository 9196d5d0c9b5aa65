"""Analytic FLOPs (multiply-accumulates, the unit of the published table) and parameter counts, for every family.

A network lists the modules of one forward pass in order (``flops_sequence()``). Each module of the family
states its own cost with ``flops(H, W) -> (macs, H_out, W_out)`` at the grid it receives; the few torch layers
that networks use directly between them (a norm over channels, the linear head, an identity) are counted here.

The accounting follows the original SPACH ``flops()`` methods (linear and conv layers with their biases,
one op per element for each norm and each residual add, the CPE as a 3x3 depth-wise conv plus bias; the head
without its bias), with one correction: the original counted the patch-embedding stem with ``sum(patch_size)``
where the kernel has ``prod(patch_size)`` taps (8 instead of 16 for a 4x4 patch, 32 instead of 256 for 16x16).
Here the stem is counted with the product. For the multi-stage models the difference is a few MFLOPs and the
totals still round to the published figures; for patch-16 models it is larger.
"""
from typing import Optional, Sequence, Tuple

from torch import nn

__all__ = ["count_flops", "count_params", "module_flops"]


def module_flops(module: nn.Module, H: int, W: int) -> Tuple[int, int, int]:
    """Multiply-accumulates of ``module`` at an ``H x W`` grid, and the grid it passes on."""
    if hasattr(module, "flops"):
        return module.flops(H, W)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
        channels = module.normalized_shape[0] if isinstance(module, nn.LayerNorm) else \
            module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
        return H * W * channels, H, W                            # one op per element
    if isinstance(module, nn.Linear):                            # the head, on the pooled features
        return module.in_features * module.out_features, H, W
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return 0, H, W
    raise TypeError(f"no FLOPs rule for {type(module).__name__}: give it a flops(H, W) method")


def count_flops(model: nn.Module, img_size: Optional[Sequence[int]] = None) -> int:
    """Multiply-accumulates of one forward pass at ``img_size`` (default: the model's own)."""
    inner = getattr(model, "model", None)  # a features_only wrapper holds the network as ``model``
    if not hasattr(model, "flops_sequence") and isinstance(inner, nn.Module):
        model = inner
    H, W = img_size if img_size is not None else model.img_size
    total = 0
    for module in model.flops_sequence():
        flops, H, W = module_flops(module, H, W)
        total += flops
    return int(total)


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a shared spatial mixer counts once)."""
    return sum(p.numel() for p in model.parameters())
