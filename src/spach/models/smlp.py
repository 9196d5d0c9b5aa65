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
dimension, BatchNorm and the convolutions see an NCHW *view* with channels-last strides, and the sparse MLP
multiplies by fuse's three column blocks first (channel maps commute with the row/column projections), then mixes
two of the results along W or H with batched products on contiguous views, accumulated into one output. Same
math, no concatenation, no permuted copies.

Note on names: the original's ``proj_h`` is applied to ``x.permute(0, 3, 1, 2)`` and therefore mixes along
the *width* axis; ``proh_w`` mixes along the *height* axis. The names are kept for the checkpoint layout;
their weights are sized by the grid's width and height respectively.
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model

from timm.models._features import feature_take_indices

from .base import BaseNet, build_model, model_cfg, register_configs, stochastic_depth_live
from .fused import capturing, channel_mlp

__all__ = ["SMLPNet", "SparseMLP", "DWConvBlock", "FeedForward", "SMLPNET_CONFIGS"]

PATCH_SIZE = 4
TOTAL_STRIDE = 32


def _pair(x) -> Tuple[int, int]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class FeedForward(nn.Module):
    """Linear - GELU - Dropout - Linear - Dropout on the last dimension (``net.0`` / ``net.3``)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        if not torch.jit.is_scripting():
            y = self._fused(x)
            if y is not None:
                return y
        return self.net(x)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        fc1, act, drop, fc2 = self.net[0], self.net[1], self.net[2], self.net[3]
        return channel_mlp(self, x, fc1.weight, fc1.bias, act, fc2.weight, fc2.bias, drop.p, residual=residual)

    @torch.jit.unused
    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` without autograd; on the fused path the sum is taken in fc2's epilogue."""
        y = self._fused(x, residual)
        return residual + self(x) if y is None else y


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
        x = self.activation(self.BN(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)).reshape(-1, C)
        # fuse([x, proj_h(x), proh_w(x)]): fuse acts on channels and the projections on one spatial axis, so
        # they commute. Each branch is first multiplied by its column block of fuse's weight (one plain
        # matrix product on the (B*H*W, C) rows), then mixed along W or H by a batched product on a
        # contiguous view, accumulated into one output. No concatenation, no permuted copies, and every
        # gradient that reaches the BatchNorm above is a plain (B, H, W, C) tensor (a permuted one sends
        # BatchNorm's backward down a slow path).
        w_x, w_h, w_w = self.fuse.weight.reshape(C, 3, C).unbind(1)
        u_h = torch.mm(x, w_h.t()).view(B * H, W, C)
        u_w = torch.mm(x, w_w.t()).view(B, H, W * C)
        out = torch.mm(x, w_x.t()).view(B * H, W, C)
        out = torch.baddbmm(out, self.proj_h.weight.reshape(W, W).expand(B * H, W, W), u_h)
        out = torch.baddbmm(out.view(B, H, W * C), self.proh_w.weight.reshape(H, H).expand(B, H, H), u_w)
        # the projections' biases, pushed through fuse's linear map as one (H, W, C) term
        b_h, b_w = self.proj_h.bias, self.proh_w.bias
        assert b_h is not None and b_w is not None  # built with biases; TorchScript needs to know
        bias = b_h.reshape(1, W, 1) * w_h.sum(1) + b_w.reshape(H, 1, 1) * w_w.sum(1)
        return out.view(B, H, W, C) + bias.to(out.dtype)


# the paper, as BibTeX
CITATION = """@inproceedings{tang2022sparse,
  title={Sparse MLP for Image Recognition: Is Self-Attention Really Necessary?},
  author={Tang, Chuanxin and Zhao, Yucheng and Wang, Guangting and Luo, Chong and Xie, Wenxuan and Zeng, Wenjun},
  booktitle={Proceedings of the AAAI Conference on Artificial Intelligence},
  year={2022}
}"""


class SMLPNet(BaseNet):
    """sMLPNet: four stages of (token mixing, channel mixing) blocks on a fixed grid.

    The token-mixing weights are sized by the grid, so a model takes the input size it was built for
    (``img_size``, a multiple of 32; default 224). ``drop_path_rate`` is the stochastic depth of the last
    block, decaying linearly to 0 at the first (the original's ``dp_rate``, which its training script never
    set: see :data:`SMLPNET_CONFIGS` for the rates the registry trained with). ``drop_rate`` is the dropout of
    the channel MLPs (the original's ``FeedForward(dropout=)``).

    The per-block modules sit in the original's flat lists (``token_mix.N``, ``channel_mix.N``), not in
    stage modules, so this network runs its stages, feature levels and head itself over the shared timm API.
    """

    citation = CITATION  # what a model card asks users to cite

    output_fmt = "NHWC"
    final_norm_name = "batch_norm"
    block_stage: List[int]  # the stage of each block, in the flat lists

    def __init__(self, num_classes: int = 1000, img_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3,
                 dim: int = 80, alpha: int = 3, depths=(2, 8, 14, 2), drop_path_rate: float = 0.0,
                 drop_rate: float = 0.0, global_pool: str = "avg", **kwargs):
        super().__init__()
        if "dp_rate" in kwargs:
            raise TypeError("dp_rate is the original sMLPNet's name for stochastic depth: pass drop_path_rate=")
        if kwargs:
            raise TypeError(f"unexpected model arguments: {sorted(kwargs)}")
        if any(size <= 0 or size % TOTAL_STRIDE for size in _pair(img_size)):
            raise ValueError(f"img_size={img_size} does not fit sMLPNet: it needs a multiple of {TOTAL_STRIDE} "
                             f"(e.g. img_size=224)")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        self.set_input_contract(img_size, in_chans, TOTAL_STRIDE, fixed_input_size=True)
        self.output_fmt = "NHWC"  # TorchScript reads instance attributes
        self.patch_size = PATCH_SIZE
        self.depths = list(depths)
        self.dim = dim
        self.alpha = alpha
        self.num_classes = num_classes
        self.global_pool = global_pool

        self.to_patch_embedding = nn.ModuleList()
        self.token_mix = nn.ModuleList()
        self.channel_mix = nn.ModuleList()
        self.drop_path = nn.ModuleList()
        num_blocks = sum(self.depths)
        self.block_stage = []
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
                                                      FeedForward(width, width * alpha, drop_rate)))
                self.block_stage.append(stage)
            self.feature_info.append(dict(num_chs=width, reduction=PATCH_SIZE * 2 ** stage,
                                          module=f"channel_mix.{len(self.block_stage) - 1}"))
        self.num_features = self.head_hidden_size = dim * 2 ** (len(self.depths) - 1)
        self.batch_norm = nn.BatchNorm2d(self.num_features)
        self.mlp_head = nn.Sequential(nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity())

    # --- forward --------------------------------------------------------------------------------------------
    def _embed_input(self, stage: int, x):
        """The NCHW input of stage ``stage``'s embedding conv, with channels-last strides (the conv's output
        is then already a (B, H, W, C) grid)."""
        if stage == 0:
            return x.contiguous(memory_format=torch.channels_last)
        return x.permute(0, 3, 1, 2)

    @torch.jit.ignore
    def _block(self, x, token: nn.Module, channel: nn.Module, drop: nn.Module):
        x = x + drop(token(x))
        return x + drop(channel(x))

    @torch.jit.ignore
    def _stage_checkpointed(self, stage: int, x):
        for index, (token, channel, drop) in enumerate(zip(self.token_mix, self.channel_mix, self.drop_path)):
            if self.block_stage[index] == stage:
                x = torch.utils.checkpoint.checkpoint(self._block, x, token, channel, drop, use_reentrant=False)
        return x

    @torch.jit.ignore
    def _stage_inference(self, stage: int, x):
        """Without autograd: each channel mixing's residual sum is taken in its fc2's epilogue (fused path)."""
        for index, (token, channel, drop) in enumerate(zip(self.token_mix, self.channel_mix, self.drop_path)):
            if self.block_stage[index] == stage:
                x = x + drop(token(x))
                if stochastic_depth_live(drop):  # as in _stage
                    x = x + drop(channel(x))
                else:
                    x = channel[2].forward_residual(channel[1](channel[0](x)), x)
        return x

    def _stage(self, stage: int, x):
        """The blocks of stage ``stage`` (modules are only called here: TorchScript cannot pass them around)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._stage_checkpointed(stage, x)
        if not torch.jit.is_scripting() and not torch.is_grad_enabled() and not capturing():
            return self._stage_inference(stage, x)
        for index, (token, channel, drop) in enumerate(zip(self.token_mix, self.channel_mix, self.drop_path)):
            if self.block_stage[index] == stage:
                x = x + drop(token(x))
                x = x + drop(channel(x))
        return x

    def forward_stem(self, x):
        x = self._embed_input(0, self.check_input(x))
        return self.to_patch_embedding[0](x).permute(0, 2, 3, 1)

    def forward_features(self, x):
        x = self.check_input(x)
        for stage, embed in enumerate(self.to_patch_embedding):
            x = embed(self._embed_input(stage, x)).permute(0, 2, 3, 1)
            x = self._stage(stage, x)
        return self.batch_norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.mlp_head(x)

    @torch.jit.ignore
    def forward_intermediates(self, x, indices: Union[int, List[int], None] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The four stage outputs (strides 4, 8, 16, 32), NCHW by default. ``norm`` applies the final
        BatchNorm to the last stage."""
        take, last = feature_take_indices(len(self.depths), indices)
        x = self.check_input(x)
        intermediates = []
        for stage, embed in enumerate(self.to_patch_embedding):
            if stop_early and stage > last:
                break
            x = self._stage(stage, embed(self._embed_input(stage, x)).permute(0, 2, 3, 1))
            if stage in take:
                y = x
                if norm and stage == len(self.depths) - 1:
                    y = self.batch_norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.batch_norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), intermediates

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

    # --- timm model API (the rest comes from BaseNet) ----------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^to_patch_embedding\.0",
                    blocks=[(r"^to_patch_embedding\.(\d+)", None), (r"^(?:token|channel)_mix\.(\d+)", None),
                            (r"^batch_norm", (99999,))])

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

    def flops_sequence(self) -> List[nn.Module]:
        return [self]

    def flops(self, H: int, W: int) -> Tuple[int, int, int]:
        """Multiply-accumulates of one image at ``H x W`` (the accounting of ``spach.count_flops``: convs and
        linears with their biases, one op per element for each norm and residual add; activations free)."""
        h, w = H // PATCH_SIZE, W // PATCH_SIZE
        C = self.dim
        flops = h * w * C * PATCH_SIZE * PATCH_SIZE * self.in_chans                  # stem conv, no bias
        for stage, depth in enumerate(self.depths[:len(self.to_patch_embedding)]):
            if stage > 0:
                h, w, C = h // 2, w // 2, C * 2
                flops += h * w * C * (C // 2) * 4                                    # 2x2 stride-2 conv, no bias
            n = h * w
            token = 2 * n * C + n * C * 9                                            # two BNs, 3x3 depth-wise conv
            token += n * C * (w + 1) + n * C * (h + 1)                               # row / column projections
            token += n * C * 3 * C                                                   # fusion 3C -> C
            hidden = C * self.alpha
            channel = n * C + n * (C + 1) * hidden + n * (hidden + 1) * C            # LayerNorm + MLP
            flops += depth * (token + channel + 2 * n * C)                           # + two residual adds
        flops += h * w * C                                                           # final BN
        head = self.get_classifier()
        if isinstance(head, nn.Linear):
            flops += head.in_features * head.out_features
        return int(flops), h, w


# --- named configurations ---------------------------------------------------------------------------------
WEIGHTS_URL_PREFIX = "https://github.com/microsoft/SPACH/releases/download/v1.0/"

# name -> architecture, the stochastic depth the original registry trained with (its `dp_rate`; `spach train`
# takes it as the model's default), and the published ImageNet-1k result (paper name, top-1, release file)
SMLPNET_CONFIGS: Dict[str, dict] = register_configs({
    "smlpnet_tiny": dict(dim=80, alpha=3, depths=(2, 8, 14, 2), drop_path_rate=0.0,
                         paper_name="sMLPNet-T", top1=81.9, weights=None),
    "smlpnet_small": dict(dim=96, alpha=3, depths=(2, 10, 24, 2), drop_path_rate=0.2,
                          paper_name="sMLPNet-S", top1=83.1, weights="smlp_s.pth"),
    "smlpnet_base": dict(dim=112, alpha=3, depths=(2, 10, 24, 2), drop_path_rate=0.3,
                         paper_name="sMLPNet-B", top1=83.4, weights="smlp_b.pth"),
})


def _cfg(name: str) -> dict:
    meta = SMLPNET_CONFIGS[name]
    file = meta["weights"]
    cfg = model_cfg(url=WEIGHTS_URL_PREFIX + file if file else "", pool_size=(7, 7), fixed_input_size=True,
                    first_conv="to_patch_embedding.0.0", description=meta["paper_name"],
                    notes=() if file else ("no release file: the original repository published no weights for "
                                           "this model",),
                    paper_ids="arXiv:2109.05422",
                    paper_name="Sparse MLP for Image Recognition: Is Self-Attention Really Necessary?",
                    origin_url="https://github.com/microsoft/SPACH")
    cfg["classifier"] = "mlp_head.0"
    return cfg


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in SMLPNET_CONFIGS})


@register_model
def smlpnet_tiny(pretrained=False, **kwargs) -> SMLPNet:
    return build_model(SMLPNet, "smlpnet_tiny", pretrained, **kwargs)


@register_model
def smlpnet_small(pretrained=False, **kwargs) -> SMLPNet:
    return build_model(SMLPNet, "smlpnet_small", pretrained, **kwargs)


@register_model
def smlpnet_base(pretrained=False, **kwargs) -> SMLPNet:
    return build_model(SMLPNet, "smlpnet_base", pretrained, **kwargs)
