"""SPACH building blocks: stems, spatial mixers, channel MLP, convolutional position encoding, downsampling.

Tensors between blocks are channels-last token grids ``(B, H, W, C)``. LayerNorm and the linear layers act
on the last dimension directly, and a depth-wise conv sees ``x.permute(0, 3, 1, 2)``: an NCHW *view* with
channels-last strides, the same layout the original code fed its convolutions (it reshaped ``(B, N, C)``
tokens with ``rearrange``). The math is the original's, operation for operation; only the bookkeeping of
the grid size moved from ``sqrt(N)`` into the tensor shape, which is what lets conv and attention models
take non-square and non-224 inputs.

Module and parameter names mirror the original implementation so that official checkpoints load unchanged.
"""
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import register_notrace_function

from .fused import channel_mlp

__all__ = [
    "ToChannelsFirst", "ToChannelsLast", "PatchEmbed", "Conv4PatchEmbed", "STEM_LAYERS", "SpatialAttention",
    "SpatialMLP", "ChannelMLP", "DWConv", "DownsampleConv", "SPATIAL_MIXERS", "default_norm_layer", "attention",
    "check_token_count",
]

default_norm_layer = partial(nn.LayerNorm, eps=1e-6)


def _pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class ToChannelsFirst(nn.Module):
    """``(B, H, W, C)`` -> ``(B, C, H, W)`` view (channels-last memory), for convolutions."""

    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class ToChannelsLast(nn.Module):
    """``(B, C, H, W)`` -> ``(B, H, W, C)``."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """One strided convolution: ``patch_size`` x ``patch_size`` patches to ``embed_dim`` channels."""

    def __init__(self, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.patch_size = _pair(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x):
        return self.proj(x)

    def flops(self, H: int, W: int) -> Tuple[int, int, int]:
        """Multiply-accumulates at an ``H x W`` input (bias included) and the output grid."""
        ph, pw = self.patch_size
        h, w = H // ph, W // pw
        return h * w * self.embed_dim * (ph * pw * self.in_chans + 1), h, w


class Conv4PatchEmbed(nn.Module):
    """Four-convolution stem (7x7/2, 3x3, 3x3 with BatchNorm + ReLU, then a patch_size/2 strided conv).

    Used by SPACH-Hybrid-MS-S+ ("conv4" stem). Total stride equals ``patch_size``.
    """

    def __init__(self, patch_size=16, in_chans=3, embed_dim=768, hidden_chans=64):
        super().__init__()
        self.patch_size = _pair(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.hidden_chans = hidden_chans
        sub = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, hidden_chans, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(hidden_chans),
            nn.ReLU(),
            nn.Conv2d(hidden_chans, hidden_chans, 3, 1, 1, bias=False),
            nn.BatchNorm2d(hidden_chans),
            nn.ReLU(),
            nn.Conv2d(hidden_chans, hidden_chans, 3, 1, 1, bias=False),
            nn.BatchNorm2d(hidden_chans),
            nn.ReLU(),
            nn.Conv2d(hidden_chans, embed_dim, kernel_size=sub, stride=sub),
        )

    def forward(self, x):
        return self.proj(x)

    def flops(self, H: int, W: int) -> Tuple[int, int, int]:
        """Multiply-accumulates (each BatchNorm one op per element) and the output grid."""
        ph, pw = self.patch_size
        h2, w2 = (H + 1) // 2, (W + 1) // 2  # 7x7 stride-2 conv, padding 3
        c = self.hidden_chans
        flops = h2 * w2 * c * (self.in_chans * 49 + 1)          # conv 7x7 + BN
        flops += 2 * h2 * w2 * c * (c * 9 + 1)                  # two conv 3x3 + BN
        sh, sw = ph // 2, pw // 2
        h, w = h2 // sh, w2 // sw
        flops += h * w * self.embed_dim * (sh * sw * c + 1)     # patch conv
        return flops, h, w


STEM_LAYERS = {"conv1": PatchEmbed, "conv4": Conv4PatchEmbed}


@register_notrace_function  # its branches read the tensors (dtype, device, autograd): one leaf of an fx graph
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float, fused: bool,
              cpu_bf16_explicit_max_tokens: int) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over ``(B, heads, N, head_dim)``: SDPA when ``fused``, except for a bf16 CPU
    training step with at most ``cpu_bf16_explicit_max_tokens`` tokens (see :class:`SpatialAttention`)."""
    if (fused and q.requires_grad and q.dtype == torch.bfloat16 and q.device.type == "cpu"
            and q.shape[2] <= cpu_bf16_explicit_max_tokens):
        fused = False
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    attn = F.dropout(attn, p=dropout_p, training=dropout_p > 0.0)
    return attn @ v


class SpatialAttention(nn.Module):
    """Multi-head self-attention over all tokens of the grid (no positional bias: the CPE provides position).

    ``fused_attn`` uses :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
    kernels on GPU); the explicit softmax form is kept for reference and equals it within fp32 tolerance.

    One exception to ``fused_attn``: a bf16 training step (autograd recording) on a CPU with at most
    ``cpu_bf16_explicit_max_tokens`` tokens takes the explicit form, because PyTorch's CPU kernels run it faster
    per training step than SDPA's bf16 CPU kernels (measured in ``benchmarks/RESULTS.md``; inference is not
    faster, so it keeps SDPA). The token bound keeps the ``N x N`` score matrix that the backward pass stores small.
    The choice depends on the tensors, so it is made in :func:`attention`, which fx graphs keep as one call.
    """

    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 fused_attn=True, **kwargs):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.cpu_bf16_explicit_max_tokens = 1024
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        out = attention(q, k, v, self.scale, self.attn_drop.p if self.training else 0.0, self.fused_attn,
                        self.cpu_bf16_explicit_max_tokens)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        out = self.proj(out)
        out = self.proj_drop(out)
        return out


class ChannelMLP(nn.Module):
    """Channel-mixing MLP (the transformer FFN): Linear -> GELU -> Linear on the channel dimension."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0,
                 **kwargs):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def mlp(self, x):
        if not torch.jit.is_scripting():
            y = self._fused(x)
            if y is not None:
                return y
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x

    def forward(self, x):
        return self.mlp(x)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return channel_mlp(self, x, self.fc1.weight, self.fc1.bias, self.act, self.fc2.weight, self.fc2.bias,
                           self.drop.p)


@register_notrace_function  # a leaf of fx graphs: the check runs when the graph runs, never while tracing
@torch.jit.ignore
def check_token_count(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``x`` itself, after checking that its ``(B, H, W, C)`` grid has the ``num_tokens`` a token MLP mixes."""
    H, W = x.shape[1], x.shape[2]
    if H * W != num_tokens:
        raise ValueError(
            f"spatial-MLP block mixes exactly {num_tokens} tokens, but this input gives a {H}x{W} grid "
            f"({H * W} tokens): spatial-MLP models are tied to the input size they were built for; "
            f"use that input size, or create the model with img_size=<your size>")
    return x


class SpatialMLP(ChannelMLP):
    """Token-mixing MLP: the same two-layer MLP applied across the ``in_features`` tokens of each channel.

    Its weights are sized by the token count, so a model built for 224x224 only accepts 224x224
    (build the model with another ``img_size`` to train at that size).
    """

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0,
                 **kwargs):
        super().__init__(in_features, hidden_features, out_features, act_layer, drop)
        self.in_features = in_features

    def forward(self, x):
        if not torch.jit.is_scripting():
            x = check_token_count(x, self.in_features)
        B, H, W, C = x.shape
        x = self.mlp(x.reshape(B, H * W, C).transpose(1, 2))
        return x.transpose(1, 2).reshape(B, H, W, C)


class DWConv(nn.Module):
    """3x3 depth-wise convolution on the token grid: the convolutional position encoding (CPE)."""

    def __init__(self, dim, kernel_size=3):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.net = nn.Sequential(
            ToChannelsFirst(),
            nn.Conv2d(dim, dim, kernel_size, 1, (kernel_size - 1) // 2, groups=dim),
            ToChannelsLast(),
        )

    def forward(self, x):
        return self.net(x)


class DownsampleConv(nn.Module):
    """2x2 stride-2 convolution (no bias) + GroupNorm(1): halves the grid, changes the width."""

    def __init__(self, in_channels, out_channels, kernel_size=2, stride=2):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.net = nn.Sequential(
            ToChannelsFirst(),
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, bias=False),
                nn.GroupNorm(num_groups=1, num_channels=out_channels),
            ),
            ToChannelsLast(),
        )

    def forward(self, x):
        return self.net(x)

    def flops(self, H: int, W: int) -> Tuple[int, int, int]:
        """Multiply-accumulates of the conv and the GroupNorm (one op per element) and the output grid."""
        h, w = H // self.stride, W // self.stride
        c = self.out_channels
        return h * w * c * self.in_channels * self.kernel_size ** 2 + h * w * c, h, w


# 'pass' (no spatial mixer: the CPE depth-wise conv is the only spatial operation) is the conv family.
SPATIAL_MIXERS = {"attn": SpatialAttention, "mlp": SpatialMLP, "pass": None}
