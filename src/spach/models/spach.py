"""SPACH networks: the mixing block, the single-stage network and the multi-stage network.

A :class:`MixingBlock` does spatial mixing (self-attention, token MLP, or nothing but the convolutional
position encoding for the conv family), then channel mixing (an MLP), each in a pre-norm residual branch;
the CPE (3x3 depth-wise conv) runs in parallel on the block input. Layer-scale multiplies the spatial branch
only. :class:`Spach` keeps one resolution (patch 16); :class:`SpachMS` has four stages (patch 4, 2x2
stride-2 downsampling with width doubling, linear stochastic-depth decay).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.layers import DropPath

from .layers import (SPATIAL_MIXERS, STEM_LAYERS, ChannelMLP, DWConv, DownsampleConv, default_norm_layer)

__all__ = ["MixingBlock", "Spach", "SpachMS", "resolve_spatial_mixer"]


def resolve_spatial_mixer(kind: str):
    if kind not in SPATIAL_MIXERS:
        raise ValueError(f"unknown spatial mixer {kind!r}; expected one of {sorted(SPATIAL_MIXERS)}")
    return SPATIAL_MIXERS[kind]


class MixingBlock(nn.Module):
    """Spatial mixing + channel mixing with a parallel CPE.

    ``spatial_func`` is a mixer class (built here), an already-built module shared between blocks
    (``shared_spatial_func=True``), or ``None`` for the conv family, where the CPE's depth-wise conv is
    the only spatial operation.
    """

    def __init__(self, dim, spatial_func=None, scaled=True, init_values=1e-4, shared_spatial_func=False,
                 norm_layer=default_norm_layer, act_layer=nn.GELU, drop_path=0.0, cpe=True,
                 num_heads=None, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 in_features=None, hidden_features=None, drop=0.0, channel_ratio=2.0):
        super().__init__()
        if spatial_func is not None:
            if isinstance(spatial_func, nn.Module):
                self.spatial_func = spatial_func  # shared instance
            else:
                self.spatial_func = spatial_func(
                    dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                    proj_drop=proj_drop, in_features=in_features, hidden_features=hidden_features,
                    act_layer=act_layer, drop=drop)
            self.norm1 = norm_layer(dim)
            self.gamma_1 = nn.Parameter(init_values * torch.ones(1, 1, dim)) if scaled else None
        else:
            self.spatial_func = None
            self.norm1 = None
            self.gamma_1 = None
        self.channel_func = ChannelMLP(in_features=dim, hidden_features=int(dim * channel_ratio),
                                       act_layer=act_layer, drop=drop)
        self.norm2 = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.cpe_net = DWConv(dim) if cpe else None

    def forward(self, x):
        shortcut = x
        if self.spatial_func is not None:
            y = self.spatial_func(self.norm1(shortcut))
            if self.gamma_1 is not None:
                y = self.gamma_1 * y
            x = x + self.drop_path(y)
        if self.cpe_net is not None:
            x = x + self.cpe_net(shortcut)
        x = x + self.drop_path(self.channel_func(self.norm2(x)))
        return x


def _init_weights(module: nn.Module, name: str):
    """The original initialisation: xavier linears, zero head, kaiming (fan-out) convs, unit norms."""
    if isinstance(module, nn.Linear):
        if name.startswith("head"):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _checkpointed(module: nn.Module, x):
    return torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)


class _SpachBase(nn.Module):
    """What both network shapes share: stem + norm1, norm2, mean-pool head, and the timm model API."""

    output_fmt = "NHWC"

    def _build_stem(self, stem_type, patch_size, in_chans, hidden_dim, img_size, norm_layer):
        if stem_type not in STEM_LAYERS:
            raise ValueError(f"unknown stem_type {stem_type!r}; expected one of {sorted(STEM_LAYERS)}")
        self.img_size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.stem_type = stem_type
        self.stem = STEM_LAYERS[stem_type](patch_size=patch_size, in_chans=in_chans, embed_dim=hidden_dim)
        self.norm1 = norm_layer(hidden_dim)
        grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        return grid

    def _build_head(self, num_classes, global_pool):
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def init_weights(self):
        for name, module in self.named_modules():
            _init_weights(module, name)

    # --- input checks -------------------------------------------------------------------------------
    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[2], x.shape[3]
        if H % self.total_stride != 0 or W % self.total_stride != 0 or H == 0 or W == 0:
            raise ValueError(
                f"input {H}x{W} is not a multiple of this model's total stride {self.total_stride}: "
                f"resize or crop to a multiple of {self.total_stride} (e.g. {self.img_size[0]}x{self.img_size[1]})")
        if self.fixed_input_size and (H, W) != self.img_size:
            raise ValueError(
                f"this spatial-MLP model mixes a fixed number of tokens and only takes "
                f"{self.img_size[0]}x{self.img_size[1]} inputs (got {H}x{W}); create it with img_size={H} "
                f"(new token-MLP weights) or feed {self.img_size[0]}x{self.img_size[1]} images")

    def _stem_forward(self, x):
        if not torch.jit.is_scripting():
            self._check_input(x)
        x = self.stem(x).permute(0, 2, 3, 1)  # NCHW -> NHWC token grid
        return self.norm1(x)

    # --- timm API -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        # The original recipe decays every tensor of more than one dimension (layer-scale gammas included)
        # and skips biases and norm weights, which the optimiser factory handles by shape.
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        x = self.forward_features(x)
        return self.forward_head(x)


class Spach(_SpachBase):
    """Single-stage SPACH: patch-16 stem, ``depth`` mixing blocks at one resolution, mean pool, linear head.

    ``net_arch`` is a list of ``(mixer, depth)``; mixer is ``'attn'``, ``'mlp'`` or ``'pass'`` (conv).
    Stochastic depth is the same rate in every block, as in the original.
    """

    def __init__(self, num_classes=1000, img_size=224, in_chans=3, hidden_dim=384, patch_size=16,
                 net_arch=None, act_layer=nn.GELU, norm_layer=default_norm_layer, stem_type="conv1",
                 scaled=True, init_values=1e-4, drop_path_rate=0.0, cpe=True, shared_spatial_func=False,
                 num_heads=12, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 token_ratio=0.5, channel_ratio=2.0, drop_rate=0.0, global_pool="avg", fused_attn=True,
                 **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected model arguments: {sorted(kwargs)}")
        if not net_arch:
            raise ValueError("net_arch must be a non-empty list of (mixer, depth)")
        grid = self._build_stem(stem_type, patch_size, in_chans, hidden_dim, img_size, norm_layer)
        num_tokens = grid[0] * grid[1]
        self.hidden_dim = hidden_dim
        self.num_features = self.head_hidden_size = hidden_dim
        self.total_stride = patch_size
        self.net_arch = [tuple(a) for a in net_arch]
        self.fixed_input_size = any(kind == "mlp" for kind, _ in self.net_arch)
        self.grad_checkpointing = False

        block_kwargs = dict(dim=hidden_dim, scaled=scaled, init_values=init_values, cpe=cpe,
                            norm_layer=norm_layer, act_layer=act_layer, num_heads=num_heads, qkv_bias=qkv_bias,
                            qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop, in_features=num_tokens,
                            hidden_features=int(num_tokens * token_ratio), channel_ratio=channel_ratio,
                            drop=drop_rate)
        shared = None
        if shared_spatial_func:
            if len(self.net_arch) != 1 or resolve_spatial_mixer(self.net_arch[0][0]) is None:
                raise ValueError("shared_spatial_func needs a single attn or mlp mixer in net_arch")
            shared = _build_mixer(self.net_arch[0][0], block_kwargs, fused_attn)
        blocks = []
        for kind, depth in self.net_arch:
            for _ in range(depth):
                mixer = shared if shared is not None else _mixer_factory(kind, fused_attn)
                blocks.append(MixingBlock(spatial_func=mixer, drop_path=drop_path_rate, **block_kwargs))
        self.blocks = nn.Sequential(*blocks)
        self.norm2 = norm_layer(hidden_dim)
        self._build_head(num_classes, global_pool)
        self.feature_info = [dict(num_chs=hidden_dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(len(blocks))]
        self.init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem|^norm1", blocks=[(r"^blocks\.(\d+)", None), (r"^norm2", (99999,))])

    def forward_features(self, x):
        x = self._stem_forward(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for blk in self.blocks:
                x = _checkpointed(blk, x)
        else:
            x = self.blocks(x)
        return self.norm2(x)

    @torch.jit.ignore
    def forward_intermediates(self, x, indices: Union[int, List[int], None] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Outputs of the chosen blocks (all at stride ``patch_size``), NCHW or NHWC."""
        take = _feature_take_indices(len(self.blocks), indices)
        x = self._stem_forward(x)
        intermediates = []
        last = max(take)
        for i, blk in enumerate(self.blocks):
            x = _checkpointed(blk, x) if self.grad_checkpointing else blk(x)
            if i in take:
                y = self.norm2(x) if norm else x
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
            if stop_early and i >= last:
                break
        if intermediates_only:
            return intermediates
        return self.norm2(x), intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        take = _feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max(take) + 1]
        if prune_norm:
            self.norm2 = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


class SpachMS(_SpachBase):
    """Multi-stage SPACH: patch-4 stem, four stages (``layer1``..``layer4``), each after the first opened
    by a 2x2 stride-2 conv + GroupNorm(1) that doubles the width; stochastic depth decays linearly from 0
    at the first block to ``drop_path_rate`` at the last.

    ``net_arch`` is four lists of ``(mixer, depth)``; a stage may mix kinds (hybrids: conv then attention).
    """

    def __init__(self, num_classes=1000, img_size=224, in_chans=3, hidden_dim=384, patch_size=4,
                 net_arch=None, act_layer=nn.GELU, norm_layer=default_norm_layer, stem_type="conv1",
                 scaled=True, init_values=1e-4, drop_path_rate=0.0, cpe=True, shared_spatial_func=False,
                 num_heads=12, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 token_ratio=0.5, channel_ratio=2.0, drop_rate=0.0, global_pool="avg", fused_attn=True,
                 **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected model arguments: {sorted(kwargs)}")
        if not net_arch or len(net_arch) != 4:
            raise ValueError("net_arch of a multi-stage model must have four stages")
        grid = self._build_stem(stem_type, patch_size, in_chans, hidden_dim, img_size, norm_layer)
        self.hidden_dim = hidden_dim
        self.num_features = self.head_hidden_size = hidden_dim * 8
        self.total_stride = patch_size * 8
        self.net_arch = [[tuple(a) for a in stage] for stage in net_arch]
        self.fixed_input_size = any(kind == "mlp" for stage in self.net_arch for kind, _ in stage)
        self.grad_checkpointing = False

        num_blocks = sum(depth for stage in self.net_arch for _, depth in stage)
        dim, tokens, block_idx = hidden_dim, grid[0] * grid[1], 0
        self.feature_info = []
        for stage_idx, stage_arch in enumerate(self.net_arch):
            blocks = []
            if stage_idx > 0:
                blocks.append(DownsampleConv(dim, dim * 2))
                dim, tokens = dim * 2, tokens // 4
            block_kwargs = dict(dim=dim, scaled=scaled, init_values=init_values, cpe=cpe, norm_layer=norm_layer,
                                act_layer=act_layer, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                attn_drop=attn_drop, proj_drop=proj_drop, in_features=tokens,
                                hidden_features=int(tokens * token_ratio), channel_ratio=channel_ratio,
                                drop=drop_rate)
            shared = None
            if stage_idx > 0 and shared_spatial_func:
                if len(stage_arch) != 1 or resolve_spatial_mixer(stage_arch[0][0]) is None:
                    raise ValueError("shared_spatial_func needs a single attn or mlp mixer in stages 2-4")
                shared = _build_mixer(stage_arch[0][0], block_kwargs, fused_attn)
            for kind, depth in stage_arch:
                for _ in range(depth):
                    dpr = drop_path_rate * block_idx / max(num_blocks - 1, 1)
                    mixer = shared if shared is not None else _mixer_factory(kind, fused_attn)
                    blocks.append(MixingBlock(spatial_func=mixer, drop_path=dpr, **block_kwargs))
                    block_idx += 1
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** stage_idx,
                                          module=f"layer{stage_idx + 1}"))
        self.norm2 = norm_layer(dim)
        self._build_head(num_classes, global_pool)
        self.init_weights()

    __jit_unused_properties__ = ["stages"]

    @property
    def stages(self) -> List[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem|^norm1",
                    blocks=r"^layer(\d+)" if coarse else [(r"^layer(\d+)\.(\d+)", None), (r"^norm2", (99999,))])

    @torch.jit.ignore
    def _run_stage(self, stage: nn.Sequential, x):
        if self.grad_checkpointing:
            for blk in stage:
                x = _checkpointed(blk, x)
            return x
        return stage(x)

    def forward_features(self, x):
        x = self._stem_forward(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.stages:
                x = self._run_stage(stage, x)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
        return self.norm2(x)

    @torch.jit.ignore
    def forward_intermediates(self, x, indices: Union[int, List[int], None] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The four stage outputs (strides 4, 8, 16, 32 for patch 4), NCHW by default: a detection /
        segmentation backbone. ``norm`` applies the final norm to the last stage only."""
        take = _feature_take_indices(4, indices)
        x = self._stem_forward(x)
        intermediates = []
        for i, stage in enumerate(self.stages):
            x = self._run_stage(stage, x)
            if i in take:
                y = self.norm2(x) if (norm and i == 3) else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
            if stop_early and i >= max(take):
                break
        if intermediates_only:
            return intermediates
        return self.norm2(x), intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices=4, prune_norm: bool = False, prune_head: bool = True):
        take = _feature_take_indices(4, indices)
        for i in range(max(take) + 1, 4):
            setattr(self, f"layer{i + 1}", nn.Sequential())
        if prune_norm:
            self.norm2 = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


def _mixer_factory(kind: str, fused_attn: bool):
    cls = resolve_spatial_mixer(kind)
    if cls is None or kind != "attn":
        return cls

    def build_attention(**kw):
        return cls(fused_attn=fused_attn, **kw)
    return build_attention


def _build_mixer(kind: str, block_kwargs: dict, fused_attn: bool) -> nn.Module:
    factory = _mixer_factory(kind, fused_attn)
    kw = {k: v for k, v in block_kwargs.items() if k in (
        "dim", "num_heads", "qkv_bias", "qk_scale", "attn_drop", "proj_drop", "in_features", "hidden_features",
        "act_layer", "drop")}
    return factory(**kw)


def _feature_take_indices(num: int, indices: Union[int, Sequence[int], None]) -> List[int]:
    """timm semantics: an int n takes the last n; a list takes those (negative from the end)."""
    if indices is None:
        return list(range(num))
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f"indices={indices} out of range: this model has {num} feature levels")
        return list(range(num - indices, num))
    take = [i if i >= 0 else num + i for i in indices]
    for i in take:
        if not 0 <= i < num:
            raise ValueError(f"feature index {i} out of range: this model has {num} feature levels")
    return sorted(take)
