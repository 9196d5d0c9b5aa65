"""ShiftViT (Wang et al., "When Shift Operation Meets Vision Transformer", arXiv 2201.10801).

A Swin-like four-stage network whose attention is replaced by a parameter-free shift: each block moves
four groups of ``C / n_div`` channels by one pixel (left, right, up, down, zero-filled), leaves the rest in
place, and adds a pre-norm channel MLP (1x1 convolutions). Stages end in a patch merging (norm, then a 2x2
stride-2 convolution that doubles the width); a patch-4 convolution with a norm is the stem.

Tensors are NCHW throughout, as in the original (stored channels-last: see ``forward_stem``). Module and parameter names are the original's (``layers``,
``blocks``, a block's only norm called ``norm2``, ``downsample.reduction``) so its checkpoints load unchanged.

The shift is the original's math written as one split, four (negative/positive) pads and one concatenation:
the original builds a zero tensor and copies five slices into it, and its backward pass builds one zero
tensor of the full input size per slice and sums them.
"""
import inspect
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from .base import (WEIGHTS_URL_PREFIX, BaseNet, FamilyOptions, build_model, model_cfg, register_configs,
                   stochastic_depth_live)
from .fused import capturing, channel_mlp

__all__ = ["ShiftViT", "ShiftBlock", "shift_channels", "NORM_LAYERS", "ACT_LAYERS", "SHIFTVIT_CONFIGS",
           "norm_layer_of_state_dict", "checkpoint_model_kwargs", "VARIANT_OPTIONS"]


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group: normalises over (C, H, W) per sample, a LayerNorm for NCHW maps."""

    def __init__(self, num_channels: int):
        super().__init__(1, num_channels)


# the original's string options for ``norm_layer`` and ``act_layer``
NORM_LAYERS = {"GN1": GroupNorm1, "BN": nn.BatchNorm2d}
ACT_LAYERS = {"GELU": nn.GELU, "RELU": partial(nn.ReLU, inplace=False)}


def shift_channels(x: torch.Tensor, n_div: int) -> torch.Tensor:
    """Shift channel groups ``[0, g)`` left, ``[g, 2g)`` right, ``[2g, 3g)`` up and ``[3g, 4g)`` down by one
    pixel (``g = C // n_div``), zero-filling the vacated border; the other channels stay.

    Eager, the result is written into one uninitialised tensor (the original zero-filled a whole tensor first)
    and, when gradients are needed, the backward pass is the opposite shift written the same way (autograd of
    the original's slice copies builds and sums one zero tensor of the full input size per slice). Graph
    capture (TorchScript, fx, ONNX / torch.export, torch.compile) gets the same math as pure functions."""
    if torch.jit.is_scripting() or capturing():
        return _shift_functional(x, n_div)
    return _shift_eager(x, n_div)


@torch.jit.unused
def _shift_eager(x: torch.Tensor, n_div: int) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _Shift.apply(x, n_div)
    return _shift_into(torch.empty_like(x), x, x.shape[1] // n_div, True)


def _shift_functional(x: torch.Tensor, n_div: int) -> torch.Tensor:
    # a negative pad crops: each group's shift is one pad
    C = x.shape[1]
    g = C // n_div
    left, right, up, down, rest = torch.split(x, [g, g, g, g, C - 4 * g], dim=1)
    return torch.cat([F.pad(left, (-1, 1)), F.pad(right, (1, -1)),
                      F.pad(up, (0, 0, -1, 1)), F.pad(down, (0, 0, 1, -1)), rest], dim=1)


def _shift_into(out: torch.Tensor, x: torch.Tensor, g: int, forward: bool) -> torch.Tensor:
    """``out`` = the shift of ``x`` (``forward``) or its adjoint, the opposite shift (the gradient)."""
    # every channel first, then the shifted groups over it: on channels-last maps one contiguous pass costs less
    # than a strided pass over the channels that stay (benchmarks/RESULTS.md)
    out.copy_(x)
    return _shift_groups(out, x, g, forward)


def _shift_groups(out: torch.Tensor, src: torch.Tensor, g: int, forward: bool = True) -> torch.Tensor:
    """Write the four groups of ``src`` (its first ``4 g`` channels) shifted into ``out``'s, zero-filling the
    vacated border: the forward shift, or with ``forward=False`` its adjoint."""
    a, b = (slice(None, -1), slice(1, None)) if forward else (slice(1, None), slice(None, -1))
    first, last = (-1, 0) if forward else (0, -1)
    out[:, :g, :, a] = src[:, :g, :, b]                          # left
    out[:, :g, :, first] = 0
    out[:, g:2 * g, :, b] = src[:, g:2 * g, :, a]                # right
    out[:, g:2 * g, :, last] = 0
    out[:, 2 * g:3 * g, a] = src[:, 2 * g:3 * g, b]              # up
    out[:, 2 * g:3 * g, first] = 0
    out[:, 3 * g:4 * g, b] = src[:, 3 * g:4 * g, a]              # down
    out[:, 3 * g:4 * g, last] = 0
    return out


def _shift_inplace(z: torch.Tensor, g: int) -> torch.Tensor:
    """Shift ``z`` in place (inference, on a fresh tensor): the channels that stay are not moved at all; the four
    shifted groups go through one small copy."""
    groups = z[:, :4 * g].clone()
    return _shift_groups(z, groups, g)


class _Shift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n_div: int):
        ctx.g = x.shape[1] // n_div
        return _shift_into(torch.empty_like(x), x, ctx.g, True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _shift_into(torch.empty_like(grad), grad, ctx.g, False), None


class ShiftMlp(nn.Module):
    """The channel MLP: two 1x1 convolutions on NCHW maps (the original's ``Mlp``; its parameters), computed
    as linear layers on the channels-last maps."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.hidden_features = hidden
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        # the maps are channels-last (see forward_stem), so the 1x1 convolutions are matrix products on the
        # (B, H, W, C) view: both ways these cost far less than the convolution kernels' 1x1 path (RESULTS.md)
        x = x.permute(0, 2, 3, 1)
        w1, w2 = self.fc1.weight.flatten(1), self.fc2.weight.flatten(1)
        if not torch.jit.is_scripting():
            y = self._fused(x, w1, w2)
            if y is not None:
                return y.permute(0, 3, 1, 2)
        h = self.drop(self.act(F.linear(x, w1, self.fc1.bias)))
        return self.drop(F.linear(h, w2, self.fc2.bias)).permute(0, 3, 1, 2)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
               residual: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        return channel_mlp(self, x, w1, self.fc1.bias, self.act, w2, self.fc2.bias, self.drop.p, autograd=True,
                           residual=residual)

    @torch.jit.unused
    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` without autograd; on the fused path the sum is taken in fc2's epilogue (no pass of
        its own). Always a new tensor."""
        y = self._fused(x.permute(0, 2, 3, 1), self.fc1.weight.flatten(1), self.fc2.weight.flatten(1),
                        residual.permute(0, 2, 3, 1))
        return residual + self(x) if y is None else y.permute(0, 3, 1, 2)


class ShiftBlock(nn.Module):
    """Shift, then ``x + drop_path(mlp(norm2(x)))`` on the shifted map (the residual starts after the shift)."""

    def __init__(self, dim: int, n_div: int = 12, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, act_layer=nn.GELU, norm_layer=GroupNorm1):
        super().__init__()
        self.dim = dim
        self.n_div = n_div
        self.norm2 = norm_layer(dim)
        self.mlp = ShiftMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        x = shift_channels(x, self.n_div)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_div={self.n_div} (shifts {4 * (self.dim // self.n_div)} channels)"

    def flops(self, H: int, W: int):
        """norm2 and the residual add one op per element, the two 1x1 convolutions with their biases; the shift
        moves data and costs none."""
        C, hidden = self.dim, self.mlp.hidden_features
        return H * W * ((C + 1) * hidden + (hidden + 1) * C + 2 * C), H, W


class PatchMerging(nn.Module):
    """Norm, then a 2x2 stride-2 convolution (no bias) that doubles the width."""

    def __init__(self, dim: int, norm_layer=GroupNorm1):
        super().__init__()
        self.norm = norm_layer(dim)
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=2, stride=2, bias=False)

    def forward(self, x):
        return self.reduction(self.norm(x))

    def flops(self, H: int, W: int):
        C = self.reduction.in_channels
        h, w = H // 2, W // 2
        return H * W * C + h * w * 2 * C * C * 4, h, w          # norm, 2x2 conv without bias


class ShiftStage(nn.Module):
    """``blocks`` at one resolution, then the stage's ``downsample`` (absent in the last stage)."""

    def __init__(self, dim: int, depth: int, drop_path: Sequence[float], downsample: bool, n_div: int,
                 mlp_ratio: float, drop: float, act_layer, norm_layer):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            ShiftBlock(dim, n_div=n_div, mlp_ratio=mlp_ratio, drop=drop, drop_path=drop_path[i],
                       act_layer=act_layer, norm_layer=norm_layer) for i in range(depth)])
        self.downsample = PatchMerging(dim, norm_layer=norm_layer) if downsample else None

    def forward_blocks(self, x):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for blk in self.blocks:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            return x
        if not torch.jit.is_scripting() and not torch.is_grad_enabled() and not capturing():
            return self._forward_blocks_fused(x)
        return self.blocks(x)

    @torch.jit.ignore
    def _forward_blocks_fused(self, x):
        """Without autograd: each residual sum is a new tensor (taken in fc2's epilogue on the fused path), so the
        next block's shift runs in place on it and moves only the shifted groups; the same sums land in the same
        places."""
        blocks = list(self.blocks)
        if not blocks:
            return x
        x = shift_channels(x, blocks[0].n_div)
        for i, blk in enumerate(blocks):
            if stochastic_depth_live(blk.drop_path):
                x = x + blk.drop_path(blk.mlp(blk.norm2(x)))  # stochastic depth live (train mode without autograd)
            else:
                x = blk.mlp.forward_residual(blk.norm2(x), x)
            if i + 1 < len(blocks):
                x = _shift_inplace(x, x.shape[1] // blocks[i + 1].n_div)
        return x

    def forward(self, x):
        x = self.forward_blocks(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class PatchEmbed(nn.Module):
    """Patch-4 convolution, then the norm (``patch_norm``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_layer=None):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x)
        return x

    def flops(self, H: int, W: int):
        p = self.patch_size
        h, w = H // p, W // p
        flops = h * w * self.embed_dim * (p * p * self.in_chans + 1)
        return flops + (h * w * self.embed_dim if self.norm is not None else 0), h, w


class _FeatureLevel(nn.Module):
    """One feature level: the previous stage's downsampling (which the original layout keeps at the end of that
    stage), then this stage's blocks; its output is the stage's map before its own downsampling."""

    def __init__(self, downsample: Optional[nn.Module], stage: ShiftStage):
        super().__init__()
        self.downsample = downsample
        self.stage = stage

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        return self.stage.forward_blocks(x)


def _resolve(option, table: Dict[str, type], what: str):
    if isinstance(option, str):
        if option not in table:
            raise ValueError(f"{what}={option!r} is not one of {sorted(table)}")
        return table[option]
    return option  # a layer class, as timm passes them


# the paper, as BibTeX
CITATION = """@inproceedings{wang2022shift,
  title={When Shift Operation Meets Vision Transformer: An Extremely Simple Alternative to Attention Mechanism},
  author={Wang, Guangting and Zhao, Yucheng and Tang, Chuanxin and Luo, Chong and Zeng, Wenjun},
  booktitle={Proceedings of the AAAI Conference on Artificial Intelligence},
  year={2022}
}"""


class ShiftViT(BaseNet):
    """Four stages of shift blocks on NCHW maps; ``norm_layer`` ``'GN1'`` (default) or ``'BN'``,
    ``act_layer`` ``'GELU'`` (default) or ``'RELU'``, as in the original. Any multiple of 32 is a valid
    input size. Stochastic depth rises linearly from 0 to ``drop_path_rate`` over all blocks. Feature levels are
    the four stage outputs before their downsampling (strides 4, 8, 16, 32)."""

    citation = CITATION  # what a model card asks users to cite

    output_fmt = "NCHW"
    final_norm_name = "norm"

    def __init__(self, num_classes: int = 1000, img_size=224, in_chans: int = 3, embed_dim: int = 96,
                 depths=(2, 2, 6, 2), mlp_ratio: float = 4.0, n_div: int = 12, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, norm_layer="GN1", act_layer="GELU", patch_size: int = 4,
                 patch_norm: bool = True, global_pool: str = "avg"):
        super().__init__()
        norm_layer = _resolve(norm_layer, NORM_LAYERS, "norm_layer")
        act_layer = _resolve(act_layer, ACT_LAYERS, "act_layer")
        self.embed_dim = embed_dim
        self.depths = tuple(depths)
        self.mlp_ratio = mlp_ratio
        self.n_div = n_div
        self.patch_size = patch_size
        num_stages = len(self.depths)
        self.set_input_contract(img_size, in_chans, patch_size * 2 ** (num_stages - 1), fixed_input_size=False)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        self.pos_drop = nn.Dropout(drop_rate)
        # the original's rule, to the float: linspace over all blocks (on the CPU: models may be built on "meta")
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(self.depths):
            dim = int(embed_dim * 2 ** i)
            start = sum(self.depths[:i])
            self.layers.append(ShiftStage(dim, depth, dpr[start:start + depth], downsample=i < num_stages - 1,
                                          n_div=n_div, mlp_ratio=mlp_ratio, drop=drop_rate,
                                          act_layer=act_layer, norm_layer=norm_layer))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"layers.{i}"))
        num_features = int(embed_dim * 2 ** (num_stages - 1))
        self.norm = norm_layer(num_features)
        self.init_head(num_features, num_classes, global_pool)
        self.apply(_init_weights)

    @torch.jit.ignore
    def checkpoint_mismatch_hint(self, state_dict) -> Optional[str]:
        """For a file that does not fit: if it is this architecture with the other normalization, say so."""
        found = norm_layer_of_state_dict(state_dict)
        built = "BN" if isinstance(self.norm, nn.modules.batchnorm._BatchNorm) else "GN1"  # also when synchronised
        if found is None or found == built:
            return None
        return (f"it holds {_NORM_NAMES[found]} weights and this model was built with norm_layer={built!r}: build "
                f"it with norm_layer={found!r} (spach.create_model(..., checkpoint_path=FILE) picks it from the file)")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^patch_embed",
                    blocks=r"^layers\.(\d+)" if coarse else [
                        (r"^layers\.(\d+)\.blocks\.(\d+)", None), (r"^layers\.(\d+)\.downsample", (0,)),
                        (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def run_level(self, level: nn.Module, x):
        return level(x)  # a level recomputes its own blocks under gradient checkpointing

    @torch.jit.ignore
    def feature_levels(self) -> List[nn.Module]:
        stages = list(self.layers)
        return [_FeatureLevel(stages[i - 1].downsample if i > 0 else None, stage) for i, stage in enumerate(stages)]

    def keep_levels(self, count: int):
        self.layers = self.layers[:count]
        self.layers[count - 1].downsample = None

    def forward_stem(self, x):
        x = self.check_input(x)
        # Channels-last maps: the 1x1-convolution MLPs then run as plain matrix products (NCHW makes oneDNN
        # reorder every activation into and out of its blocked layout), and GroupNorm and the shift keep the
        # layout. Values are the NCHW ones; only the memory order differs (benchmarks/RESULTS.md).
        return self.pos_drop(self.patch_embed(x.contiguous(memory_format=torch.channels_last)))

    def forward_features(self, x):
        x = self.forward_stem(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    @torch.jit.ignore
    def flops_sequence(self) -> List[nn.Module]:
        body = []
        for stage in self.layers:
            body += list(stage.blocks) + ([stage.downsample] if stage.downsample is not None else [])
        return [self.patch_embed, *body, self.norm, self.head]


def _init_weights(m: nn.Module):
    """The original initialisation: truncated normal (std 0.02) for linear and conv weights, zero biases,
    unit GroupNorm."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


_NORM_NAMES = {"BN": "BatchNorm (running statistics)", "GN1": "GroupNorm (no running statistics)"}


def norm_layer_of_state_dict(state_dict) -> Optional[str]:
    """``'BN'`` if the weights carry BatchNorm running statistics, ``'GN1'`` if they have norms without them
    (GroupNorm keeps none), None if there is no norm to tell by."""
    keys = [k for k in state_dict if k.endswith("patch_embed.norm.weight") or k.endswith(".norm2.weight")]
    if not keys:
        return None
    stats = any(k.endswith("running_mean") for k in state_dict)
    return "BN" if stats else "GN1"


# the string options that choose a variant: name -> (default, the constructor's; choices)
VARIANT_OPTIONS = {key: (inspect.signature(ShiftViT).parameters[key].default, tuple(table))
                   for key, table in (("norm_layer", NORM_LAYERS), ("act_layer", ACT_LAYERS))}


def checkpoint_model_kwargs(state_dict) -> dict:
    """The architecture arguments a weights file fixes by itself: its normalization (the releases do not say
    which one they used; BatchNorm files carry running statistics)."""
    found = norm_layer_of_state_dict(state_dict)
    return {"norm_layer": found} if found else {}


# --- the registry's configurations ------------------------------------------------------------------------
# name -> architecture (the original registry's drop_path_rate included: it is what trained the published
# models) + published ImageNet-1k top-1, paper name and release file where there is one.
SHIFTVIT_CONFIGS: Dict[str, dict] = register_configs({
    "shiftvit_light_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), mlp_ratio=4, n_div=12, drop_path_rate=0.2,
                                paper_name="Shift-T / light", top1=79.4, weights="shiftvit_tiny_light.pth"),
    "shiftvit_r4_tiny": dict(embed_dim=96, depths=(2, 2, 12, 3), mlp_ratio=4, n_div=12, drop_path_rate=0.2),
    "shiftvit_r2_tiny": dict(embed_dim=96, depths=(6, 8, 18, 6), mlp_ratio=2, n_div=12, drop_path_rate=0.2,
                             paper_name="Shift-T", top1=81.7, weights="shiftvit_tiny_r2.pth"),
    "shiftvit_light_small": dict(embed_dim=96, depths=(2, 2, 18, 2), mlp_ratio=4, n_div=12, drop_path_rate=0.4,
                                 paper_name="Shift-S / light", top1=81.6, weights="shiftvit_small_light.pth"),
    "shiftvit_r4_small": dict(embed_dim=96, depths=(2, 6, 24, 4), mlp_ratio=4, n_div=12, drop_path_rate=0.4),
    "shiftvit_r2_small": dict(embed_dim=96, depths=(10, 18, 36, 10), mlp_ratio=2, n_div=12, drop_path_rate=0.4,
                              paper_name="Shift-S", top1=82.8, weights="shiftvit_small_r2.pth"),
    "shiftvit_light_base": dict(embed_dim=128, depths=(2, 2, 18, 2), mlp_ratio=4, n_div=16, drop_path_rate=0.5),
    "shiftvit_r4_base": dict(embed_dim=128, depths=(4, 6, 22, 4), mlp_ratio=4, n_div=16, drop_path_rate=0.5),
    "shiftvit_r2_base": dict(embed_dim=128, depths=(10, 18, 36, 10), mlp_ratio=2, n_div=16, drop_path_rate=0.6),
}, FamilyOptions(recorded=tuple(VARIANT_OPTIONS), variants=VARIANT_OPTIONS, from_weights=checkpoint_model_kwargs))


def _cfg(name: str) -> dict:
    row = SHIFTVIT_CONFIGS[name]
    return model_cfg(
        url=WEIGHTS_URL_PREFIX + row["weights"] if row.get("weights") else "", pool_size=(7, 7),
        first_conv="patch_embed.proj",
        description=row.get("paper_name") or f"{name}: no released weights (train it with spach train)",
        paper_ids="arXiv:2201.10801", paper_name="When Shift Operation Meets Vision Transformer: An Extremely "
        "Simple Alternative to Attention Mechanism", origin_url="https://github.com/microsoft/SPACH")


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in SHIFTVIT_CONFIGS})


def _create(variant: str, pretrained: bool = False, **kwargs) -> ShiftViT:
    # num_classes, drop_path_rate, img_size ... are honoured (the original registry dropped them all)
    return build_model(ShiftViT, variant, pretrained, **kwargs)


@register_model
def shiftvit_light_tiny(pretrained=False, **kwargs):
    return _create("shiftvit_light_tiny", pretrained, **kwargs)


@register_model
def shiftvit_r4_tiny(pretrained=False, **kwargs):
    return _create("shiftvit_r4_tiny", pretrained, **kwargs)


@register_model
def shiftvit_r2_tiny(pretrained=False, **kwargs):
    return _create("shiftvit_r2_tiny", pretrained, **kwargs)


@register_model
def shiftvit_light_small(pretrained=False, **kwargs):
    return _create("shiftvit_light_small", pretrained, **kwargs)


@register_model
def shiftvit_r4_small(pretrained=False, **kwargs):
    return _create("shiftvit_r4_small", pretrained, **kwargs)


@register_model
def shiftvit_r2_small(pretrained=False, **kwargs):
    return _create("shiftvit_r2_small", pretrained, **kwargs)


@register_model
def shiftvit_light_base(pretrained=False, **kwargs):
    return _create("shiftvit_light_base", pretrained, **kwargs)


@register_model
def shiftvit_r4_base(pretrained=False, **kwargs):
    return _create("shiftvit_r4_base", pretrained, **kwargs)


@register_model
def shiftvit_r2_base(pretrained=False, **kwargs):
    return _create("shiftvit_r2_base", pretrained, **kwargs)
