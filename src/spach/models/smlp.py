"""sMLPNet (Tang et al., "Sparse MLP for Image Recognition: Is Self-Attention Really Necessary?", arXiv
2109.05422), the second network family of the original repository.

A block mixes tokens, then channels, each in a residual branch:
- **token mixing**: BatchNorm + GELU + 3x3 depth-wise conv, then the *sparse MLP*: BatchNorm + GELU, one
  linear layer along each image row (``proj_h``), one along each column (``proh_w``), and a 1x1 fusion of
  the input and both results (``fuse``, 3C -> C, no bias);
- **channel mixing**: LayerNorm + MLP (ratio ``alpha``).
Four stages (patch-4 conv stem, then 2x2 stride-2 convs doubling the width), BatchNorm, mean pool, linear head.

Parameter names and shapes are the original's (including ``proh_w`` and the flat per-block lists), so its
checkpoints load unchanged. The activations differ in layout only: the original permutes NCHW tensors
around every LayerNorm/MLP and around each row/column projection, and concatenates three tensors for the
fusion. Here a stage's activations stay one ``(B, H, W, C)`` tensor: LayerNorm and the MLP act on its last
dimension, BatchNorm and the convolutions see an NCHW *view* with channels-last strides, the row/column
projections are matrix products along the H or W axis of that tensor, and the fusion is three accumulated
products with the column blocks of ``fuse``'s weight. Same math, fewer copies.

Note on names: the original's ``proj_h`` is applied to ``x.permute(0, 3, 1, 2)`` and therefore mixes along
the *width* axis; ``proh_w`` mixes along the *height* axis. The names are kept for the checkpoint layout;
their weights are sized by the grid's width and height respectively.
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath
from timm.layers._fx import register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet, feature_take_indices

__all__ = ["SMLPNet", "SparseMLP", "DWConvBlock", "FeedForward", "SMLPNET_CONFIGS", "smlpnet_flops"]

PATCH_SIZE = 4
TOTAL_STRIDE = 32


def _pair(x) -> Tuple[int, int]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _bn_nhwc(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm of a ``(B, H, W, C)`` tensor through its channels-last NCHW view (no copy either way)."""
    return bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class FeedForward(nn.Module):
    """Linear - GELU - Dropout - Linear - Dropout on the last dimension (``net.0`` / ``net.3``)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class BNActConv(nn.Module):
    """BatchNorm, activation, bias-free "same"-padded convolution (the original's ``BN_Activ_Conv``)."""

    def __init__(self, channels: int, kernel_size: int = 3, groups: int = 1):
        super().__init__()
        self.BN = nn.BatchNorm2d(channels)
        self.Activation = nn.GELU()
        self.Conv = nn.Conv2d(channels, channels, kernel_size, 1, kernel_size // 2, groups=groups, bias=False)

    def forward(self, x):  # NCHW (a channels-last view here)
        return self.Conv(self.Activation(self.BN(x)))


class DWConvBlock(nn.Module):
    """BatchNorm + GELU + 3x3 depth-wise convolution on a ``(B, H, W, C)`` grid."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_merge = BNActConv(channels, 3, groups=channels)

    def forward(self, x):
        return self.conv_merge(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SparseMLP(nn.Module):
    """The sparse MLP: BatchNorm + GELU, a linear map along each row and one along each column of the grid,
    and a bias-free fusion of ``[x, rows, columns]`` back to ``channels`` (the original's ``sMLPBlock``).

    ``grid`` is ``(H, W)``: the row projection ``proj_h`` is ``W x W``, the column projection ``proh_w`` is
    ``H x H`` (1x1 convs in the original layout: weight ``(n, n, 1, 1)`` plus bias).
    """

    def __init__(self, grid: Tuple[int, int], channels: int):
        super().__init__()
        h, w = grid
        self.channels = channels
        self.BN = nn.BatchNorm2d(channels)
        self.activation = nn.GELU()
        self.proj_h = nn.Conv2d(w, w, (1, 1))
        self.proh_w = nn.Conv2d(h, h, (1, 1))
        self.fuse = nn.Conv2d(channels * 3, channels, (1, 1), (1, 1), bias=False)

    def forward(self, x):  # (B, H, W, C)
        B, H, W, C = x.shape
        x = self.activation(_bn_nhwc(self.BN, x))
        w_rows = self.proj_h.weight.reshape(W, W)
        w_cols = self.proh_w.weight.reshape(H, H)
        # along W: (W, W) @ (B, H, W, C) -> every (b, h) slice is W x C
        x_h = torch.matmul(w_rows, x) + self.proj_h.bias.reshape(W, 1)
        # along H: (H, H) @ (B, H, W*C)
        x_w = torch.matmul(w_cols, x.reshape(B, H, W * C)).reshape(B, H, W, C) + self.proh_w.bias.reshape(H, 1, 1)
        fuse = self.fuse.weight.reshape(C, 3 * C)
        return F.linear(torch.cat([x, x_h, x_w], dim=-1), fuse)


@register_notrace_function
def _check_input(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int]) -> None:
    """One clear error for an input the network cannot take (kept out of fx graphs: it branches on shapes)."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected an image batch of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
    H, W = int(x.shape[2]), int(x.shape[3])
    if (H, W) != tuple(img_size):
        raise ValueError(
            f"this sMLPNet mixes a fixed grid of tokens and only takes {img_size[0]}x{img_size[1]} inputs (got "
            f"{H}x{W}); create it with img_size={H if H == W else (H, W)} (new token-mixing weights) or feed "
            f"{img_size[0]}x{img_size[1]} images")


class SMLPNet(nn.Module):
    """sMLPNet: four stages of (token mixing, channel mixing) blocks on a fixed grid.

    The token-mixing weights are sized by the grid, so a model takes the input size it was built for
    (``img_size``, a multiple of 32; default 224). ``drop_path_rate`` is the stochastic depth of the last
    block, decaying linearly to 0 at the first (the original's ``dp_rate``, which its training script never
    set: see :data:`SMLPNET_CONFIGS` for the rates the registry trained with).
    """

    output_fmt = "NHWC"

    def __init__(self, num_classes: int = 1000, img_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3,
                 dim: int = 80, alpha: int = 3, depths=(2, 8, 14, 2), drop_path_rate: float = 0.0,
                 drop_rate: float = 0.0, global_pool: str = "avg", **kwargs):
        super().__init__()
        if "dp_rate" in kwargs:
            raise TypeError("dp_rate is the original sMLPNet's name for stochastic depth: pass drop_path_rate=")
        if kwargs:
            raise TypeError(f"unexpected model arguments: {sorted(kwargs)}")
        self.img_size = _pair(img_size)
        if any(s <= 0 or s % TOTAL_STRIDE for s in self.img_size):
            raise ValueError(f"img_size={img_size} does not fit sMLPNet: it needs a multiple of {TOTAL_STRIDE} "
                             f"(e.g. img_size=224)")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        self.in_chans = in_chans
        self.patch_size = PATCH_SIZE
        self.total_stride = TOTAL_STRIDE
        self.fixed_input_size = True
        self.depths = list(depths)
        self.dim = dim
        self.alpha = alpha
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.to_patch_embedding = nn.ModuleList()
        self.token_mix = nn.ModuleList()
        self.channel_mix = nn.ModuleList()
        self.drop_path = nn.ModuleList()
        num_blocks = sum(self.depths)
        self.block_stage: List[int] = []
        self.feature_info = []
        grid = (self.img_size[0] // PATCH_SIZE, self.img_size[1] // PATCH_SIZE)
        for stage, depth in enumerate(self.depths):
            width = dim * 2 ** stage
            if stage == 0:
                embed = nn.Conv2d(in_chans, width, PATCH_SIZE, PATCH_SIZE, bias=False)
            else:
                embed = nn.Conv2d(width // 2, width, 2, 2, bias=False)
                grid = (grid[0] // 2, grid[1] // 2)
            self.to_patch_embedding.append(nn.Sequential(embed))
            for _ in range(depth):
                index = len(self.block_stage)
                rate = drop_path_rate * index / max(num_blocks - 1, 1)
                self.drop_path.append(DropPath(rate) if rate > 0.0 else nn.Identity())
                self.token_mix.append(nn.Sequential(DWConvBlock(width), SparseMLP(grid, width)))
                # positions 0 and 3 held the original's NCHW <-> NHWC rearranges; activations here stay NHWC
                self.channel_mix.append(nn.Sequential(nn.Identity(), nn.LayerNorm(width),
                                                      FeedForward(width, width * alpha)))
                self.block_stage.append(stage)
            self.feature_info.append(dict(num_chs=width, reduction=PATCH_SIZE * 2 ** stage,
                                          module=f"channel_mix.{len(self.block_stage) - 1}"))
        self.num_features = self.head_hidden_size = dim * 2 ** (len(self.depths) - 1)
        self.batch_norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.mlp_head = nn.Sequential(nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity())

    # --- forward --------------------------------------------------------------------------------------------
    def _embed(self, stage: int, embed: nn.Module, x):
        if stage == 0:
            # the image as channels-last, so that the stem's output is already a (B, H, W, C) grid
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.permute(0, 3, 1, 2)
        return embed(x).permute(0, 2, 3, 1)

    def _block(self, x, token: nn.Module, channel: nn.Module, drop: nn.Module):
        x = x + drop(token(x))
        return x + drop(channel(x))

    def _stage(self, stage: int, x):
        for index, (token, channel, drop) in enumerate(zip(self.token_mix, self.channel_mix, self.drop_path)):
            if self.block_stage[index] == stage:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = torch.utils.checkpoint.checkpoint(self._block, x, token, channel, drop, use_reentrant=False)
                else:
                    x = self._block(x, token, channel, drop)
        return x

    def forward_features(self, x):
        if not torch.jit.is_scripting():
            _check_input(x, self.in_chans, self.img_size)
        for stage, embed in enumerate(self.to_patch_embedding):
            x = self._embed(stage, embed, x)
            x = self._stage(stage, x)
        return _bn_nhwc(self.batch_norm, x)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.mlp_head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_intermediates(self, x, indices: Union[int, List[int], None] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The four stage outputs (strides 4, 8, 16, 32), NCHW by default. ``norm`` applies the final
        BatchNorm to the last stage."""
        take, last = feature_take_indices(len(self.depths), indices)
        _check_input(x, self.in_chans, self.img_size)
        intermediates = []
        for stage, embed in enumerate(self.to_patch_embedding):
            if stop_early and stage > last:
                break
            x = self._stage(stage, self._embed(stage, embed, x))
            if stage in take:
                y = _bn_nhwc(self.batch_norm, x) if (norm and stage == len(self.depths) - 1) else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return _bn_nhwc(self.batch_norm, x), intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 4, prune_norm: bool = False,
                                  prune_head: bool = True):
        take, last = feature_take_indices(len(self.depths), indices)
        keep = sum(self.depths[:last + 1])
        self.to_patch_embedding = self.to_patch_embedding[:last + 1]
        self.token_mix = self.token_mix[:keep]
        self.channel_mix = self.channel_mix[:keep]
        self.drop_path = self.drop_path[:keep]
        self.block_stage = self.block_stage[:keep]
        if prune_norm:
            self.batch_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    # --- timm model API -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^to_patch_embedding\.0",
                    blocks=[(r"^to_patch_embedding\.(\d+)", None), (r"^(?:token|channel)_mix\.(\d+)", None),
                            (r"^batch_norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.mlp_head[0]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.mlp_head = nn.Sequential(nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity())

    def flops(self, img_size: Optional[Tuple[int, int]] = None) -> int:
        return smlpnet_flops(self, img_size)


def smlpnet_flops(model: SMLPNet, img_size: Optional[Tuple[int, int]] = None) -> int:
    """Multiply-accumulates of one image (the accounting of ``spach.count_flops``: convs and linears with
    their biases, one op per element for each norm, activation-free; residual adds one op per element)."""
    H, W = _pair(img_size) if img_size is not None else model.img_size
    h, w = H // PATCH_SIZE, W // PATCH_SIZE
    C = model.dim
    flops = h * w * C * PATCH_SIZE * PATCH_SIZE * model.in_chans                  # stem conv, no bias
    for stage, depth in enumerate(model.depths):
        if stage > 0:
            h, w, C = h // 2, w // 2, C * 2
            flops += h * w * C * (C // 2) * 4                                     # 2x2 stride-2 conv, no bias
        n = h * w
        token = n * C                                                             # BN
        token += n * C * 9                                                        # 3x3 depth-wise conv
        token += n * C                                                            # BN
        token += n * C * (w + 1) + n * C * (h + 1)                                # row / column projections
        token += n * C * 3 * C                                                    # fusion 3C -> C
        hidden = C * model.alpha
        channel = n * C + n * (C + 1) * hidden + n * (hidden + 1) * C             # LayerNorm + MLP
        flops += depth * (token + channel + 2 * n * C)                            # + two residual adds
    flops += h * w * C                                                            # final BN
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        flops += head.in_features * head.out_features
    return int(flops)


# --- named configurations ---------------------------------------------------------------------------------
WEIGHTS_URL_PREFIX = "https://github.com/microsoft/SPACH/releases/download/v1.0/"

# name -> architecture, the stochastic depth the original registry trained with (its `dp_rate`), and the
# published ImageNet-1k result (paper name, top-1, release file where there is one)
SMLPNET_CONFIGS: Dict[str, dict] = {
    "smlpnet_tiny": dict(dim=80, alpha=3, depths=(2, 8, 14, 2), drop_path_rate=0.0,
                         paper_name="sMLPNet-T", top1=81.9, weights=None),
    "smlpnet_small": dict(dim=96, alpha=3, depths=(2, 10, 24, 2), drop_path_rate=0.2,
                          paper_name="sMLPNet-S", top1=83.1, weights="smlp_s.pth"),
    "smlpnet_base": dict(dim=112, alpha=3, depths=(2, 10, 24, 2), drop_path_rate=0.3,
                         paper_name="sMLPNet-B", top1=83.4, weights="smlp_b.pth"),
}
_ARCH_KEYS = ("dim", "alpha", "depths")


def _cfg(name: str) -> dict:
    meta = SMLPNET_CONFIGS[name]
    file = meta["weights"]
    return dict(
        url=WEIGHTS_URL_PREFIX + file if file else "",
        description=meta["paper_name"],
        notes=() if file else ("no release file: the original repository published no weights for this model",),
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic",
        fixed_input_size=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="to_patch_embedding.0.0", classifier="mlp_head.0", license="mit",
        paper_ids="arXiv:2109.05422",
        paper_name="Sparse MLP for Image Recognition: Is Self-Attention Really Necessary?",
        origin_url="https://github.com/microsoft/SPACH",
    )


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in SMLPNET_CONFIGS})


def _create_smlpnet(variant: str, pretrained: bool = False, **kwargs):
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    kwargs.pop("feature_cls", None)  # only the forward_intermediates getter applies here
    output_fmt = kwargs.pop("output_fmt", "NCHW")
    arch = {k: v for k, v in SMLPNET_CONFIGS[variant].items() if k in _ARCH_KEYS}
    arch["drop_path_rate"] = SMLPNET_CONFIGS[variant]["drop_path_rate"]
    arch.update(kwargs)
    model = build_model_with_cfg(SMLPNet, variant, pretrained=False, **arch)
    if pretrained:
        from .pretrained import load_pretrained_release
        load_pretrained_release(model, variant)
    if features_only:
        model = FeatureGetterNet(model, out_indices=tuple(range(4)) if out_indices is None else out_indices,
                                 output_fmt=output_fmt)
    return model


@register_model
def smlpnet_tiny(pretrained=False, **kwargs) -> SMLPNet:
    return _create_smlpnet("smlpnet_tiny", pretrained, **kwargs)


@register_model
def smlpnet_small(pretrained=False, **kwargs) -> SMLPNet:
    return _create_smlpnet("smlpnet_small", pretrained, **kwargs)


@register_model
def smlpnet_base(pretrained=False, **kwargs) -> SMLPNet:
    return _create_smlpnet("smlpnet_base", pretrained, **kwargs)
