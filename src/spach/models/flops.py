"""Analytic FLOPs (multiply-accumulates, the unit of the published table) and parameter counts.

The accounting follows the original SPACH ``flops()`` methods (linear and conv layers with their biases,
one op per element for each norm and each residual add, the CPE as a 3x3 depth-wise conv plus bias),
with one correction: the original counted the patch-embedding stem with ``sum(patch_size)`` where the
kernel has ``prod(patch_size)`` taps (8 instead of 16 for a 4x4 patch, 32 instead of 256 for 16x16). Here
the stem is counted with the product. For the multi-stage models the difference is a few MFLOPs and the
totals still round to the published figures; for patch-16 models it is larger.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .layers import Conv4PatchEmbed, DownsampleConv, PatchEmbed, SpatialAttention, SpatialMLP
from .spach import MixingBlock

__all__ = ["count_flops", "count_params"]


def _stem_flops(stem: nn.Module, H: int, W: int) -> Tuple[int, int, int]:
    """FLOPs of the stem and its output grid."""
    if isinstance(stem, PatchEmbed):
        ph, pw = stem.patch_size
        h, w = H // ph, W // pw
        return h * w * stem.embed_dim * (ph * pw * stem.in_chans + 1), h, w
    if isinstance(stem, Conv4PatchEmbed):
        ph, pw = stem.patch_size
        h2, w2 = (H + 1) // 2, (W + 1) // 2  # 7x7 stride-2 conv, padding 3
        c = stem.hidden_chans
        flops = h2 * w2 * c * (stem.in_chans * 49 + 1)          # conv 7x7 + BN
        flops += 2 * h2 * w2 * c * (c * 9 + 1)                  # two conv 3x3 + BN
        sh, sw = ph // 2, pw // 2
        h, w = h2 // sh, w2 // sw
        flops += h * w * stem.embed_dim * (sh * sw * c + 1)     # patch conv
        return flops, h, w
    raise TypeError(f"unknown stem {type(stem).__name__}")


def _block_flops(block: MixingBlock, N: int, C: int) -> int:
    flops = 0
    mixer = block.spatial_func
    if isinstance(mixer, SpatialAttention):
        flops += 4 * N * C * C + 2 * N * N * C                 # qkv + proj, q@k^T, attn@v
        flops += 2 * N * C                                      # norm1 + residual
    elif isinstance(mixer, SpatialMLP):
        flops += (N + 1) * mixer.hidden_features * C + (mixer.hidden_features + 1) * mixer.out_features * C
        flops += 2 * N * C
    if block.cpe_net is not None:
        flops += N * C * (3 * 3 + 1)
    hidden = block.channel_func.hidden_features
    flops += (C + 1) * hidden * N + (hidden + 1) * C * N        # channel MLP
    flops += 2 * N * C                                          # norm2 + residual
    return flops


def count_flops(model: nn.Module, img_size: Optional[Sequence[int]] = None) -> int:
    """Multiply-accumulates of one forward pass at ``img_size`` (default: the model's own)."""
    model = getattr(model, "model", model) if not hasattr(model, "stem") else model
    H, W = img_size if img_size is not None else model.img_size
    flops, h, w = _stem_flops(model.stem, H, W)
    C = model.hidden_dim
    flops += h * w * C                                          # norm1
    stages = model.stages if hasattr(model, "stages") else [model.blocks]
    for stage in stages:
        for module in stage:
            if isinstance(module, DownsampleConv):
                h, w = h // 2, w // 2
                C = module.out_channels
                flops += h * w * C * module.in_channels * module.kernel_size ** 2 + h * w * C  # conv + GN
            elif isinstance(module, MixingBlock):
                flops += _block_flops(module, h * w, C)
    flops += h * w * C                                          # norm2
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        flops += head.in_features * head.out_features
    return int(flops)


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a shared spatial mixer counts once)."""
    return sum(p.numel() for p in model.parameters())
