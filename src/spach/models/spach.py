"""SPACH: the mixing block, the single-stage and multi-stage networks, and every named configuration.

A :class:`MixingBlock` does spatial mixing (self-attention, token MLP, or nothing but the convolutional
position encoding for the conv family), then channel mixing (an MLP), each in a pre-norm residual branch;
the CPE (3x3 depth-wise conv) runs in parallel on the block input. Layer-scale multiplies the spatial branch
only. :class:`Spach` keeps one resolution (patch 16); :class:`SpachMS` has four stages (patch 4, 2x2
stride-2 downsampling with width doubling, linear stochastic-depth decay).

``import spach`` (or ``import spach.models``) registers every name of :data:`SPACH_CONFIGS` with timm, so
``timm.create_model('spach_ms_s_patch4_224_conv')`` works.
"""
from typing import List

import torch
from torch import nn
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model

from .base import WEIGHTS_URL_PREFIX, BaseNet, FamilyOptions, build_model, model_cfg, register_configs
from .layers import SPATIAL_MIXERS, STEM_LAYERS, ChannelMLP, DWConv, DownsampleConv, SpatialAttention, \
    SpatialMLP, default_norm_layer

__all__ = ["MixingBlock", "Spach", "SpachMS", "SPACH_CONFIGS", "WEIGHTS_URL_PREFIX", "stage_archs"]


class MixingBlock(nn.Module):
    """Spatial mixing + channel mixing with a parallel CPE.

    ``spatial_func`` is a mixer class (built here with the attention / MLP arguments), an already-built mixer
    (possibly shared between blocks), or ``None`` for the conv family, where the CPE's depth-wise conv is the
    only spatial operation.
    """

    def __init__(self, dim, spatial_func=None, scaled=True, init_values=1e-4, norm_layer=default_norm_layer,
                 act_layer=nn.GELU, drop_path=0.0, cpe=True, num_heads=None, qkv_bias=False, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0, in_features=None, hidden_features=None, drop=0.0,
                 channel_ratio=2.0):
        super().__init__()
        if spatial_func is not None:
            if isinstance(spatial_func, nn.Module):
                self.spatial_func = spatial_func
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

    def flops(self, H: int, W: int):
        """Multiply-accumulates on an ``H x W`` grid (norms and residual adds one op per element)."""
        N, C = H * W, self.channel_func.out_features
        flops = 0
        mixer = self.spatial_func
        if isinstance(mixer, SpatialAttention):
            flops += 4 * N * C * C + 2 * N * N * C                 # qkv + proj, q@k^T, attn@v
            flops += 2 * N * C                                      # norm1 + residual
        elif isinstance(mixer, SpatialMLP):
            flops += (N + 1) * mixer.hidden_features * C + (mixer.hidden_features + 1) * mixer.out_features * C
            flops += 2 * N * C
        if self.cpe_net is not None:
            flops += N * C * (3 * 3 + 1)
        hidden = self.channel_func.hidden_features
        flops += (C + 1) * hidden * N + (hidden + 1) * C * N        # channel MLP
        flops += 2 * N * C                                          # norm2 + residual
        return flops, H, W


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


def stage_archs(net_arch) -> List[List[tuple]]:
    """``net_arch`` as a list of stages, each a list of ``(mixer, depth)`` (a single-stage arch is one stage)."""
    return [[tuple(a) for a in stage] for stage in (net_arch if isinstance(net_arch[0], list) else [net_arch])]


# the paper, as BibTeX
CITATION = """@article{zhao2021battle,
  title={A Battle of Network Structures: An Empirical Study of CNN, Transformer, and MLP},
  author={Zhao, Yucheng and Wang, Guangting and Tang, Chuanxin and Luo, Chong and Zeng, Wenjun and Zha, Zheng-Jun},
  journal={arXiv preprint arXiv:2108.13002},
  year={2021}
}"""


class _SpachNet(BaseNet):
    """Stem + norm1, stages of mixing blocks (each stage after the first opened by a stride-2 downsampling that
    doubles the width), norm2, mean-pool head. The subclasses only name the stages' modules and choose the
    stochastic-depth schedule; every architecture argument is this one signature."""

    citation = CITATION  # what a model card asks users to cite

    output_fmt = "NHWC"
    final_norm_name = "norm2"
    stage_names: List[str] = []
    share_first_stage = True  # shared_spatial_func applies to the first stage too

    def __init__(self, num_classes=1000, img_size=224, in_chans=3, hidden_dim=384, patch_size=16, net_arch=None,
                 act_layer=nn.GELU, norm_layer=default_norm_layer, stem_type="conv1", scaled=True,
                 init_values=1e-4, drop_path_rate=0.0, cpe=True, shared_spatial_func=False, num_heads=12,
                 qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0, token_ratio=0.5, channel_ratio=2.0,
                 drop_rate=0.0, global_pool="avg", fused_attn=True):
        super().__init__()
        if not net_arch or len(stage_archs(net_arch)) != len(self.stage_names):
            raise ValueError(f"net_arch of {type(self).__name__} must give {len(self.stage_names)} stage(s) of "
                             f"(mixer, depth) pairs, got {net_arch!r}")
        stages = stage_archs(net_arch)
        for kind, _ in (a for stage in stages for a in stage):
            if kind not in SPATIAL_MIXERS:
                raise ValueError(f"unknown spatial mixer {kind!r}; expected one of {sorted(SPATIAL_MIXERS)}")
        if stem_type not in STEM_LAYERS:
            raise ValueError(f"unknown stem_type {stem_type!r}; expected one of {sorted(STEM_LAYERS)}")
        self.net_arch = stages if len(stages) > 1 else stages[0]
        self.hidden_dim = hidden_dim
        self.patch_size = patch_size
        self.stem_type = stem_type
        self.set_input_contract(img_size, in_chans, patch_size * 2 ** (len(stages) - 1),
                                fixed_input_size=any(kind == "mlp" for stage in stages for kind, _ in stage))
        self.stem = STEM_LAYERS[stem_type](patch_size=patch_size, in_chans=in_chans, embed_dim=hidden_dim)
        self.norm1 = norm_layer(hidden_dim)

        self.mixer_args = dict(num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                               proj_drop=proj_drop, fused_attn=fused_attn, token_ratio=token_ratio,
                               act_layer=act_layer, drop=drop_rate)
        block_args = dict(scaled=scaled, init_values=init_values, cpe=cpe, norm_layer=norm_layer,
                          act_layer=act_layer, channel_ratio=channel_ratio, drop=drop_rate)
        drop_path_rates = iter(self.drop_path_rates(drop_path_rate, sum(d for s in stages for _, d in s)))
        dim, tokens = hidden_dim, (self.img_size[0] // patch_size) * (self.img_size[1] // patch_size)
        self.feature_info = []
        for i, arch in enumerate(stages):
            modules = []
            if i > 0:
                modules.append(DownsampleConv(dim, dim * 2))
                dim, tokens = dim * 2, tokens // 4
            shared = None
            if shared_spatial_func and (i > 0 or self.share_first_stage):
                if len(arch) != 1 or SPATIAL_MIXERS[arch[0][0]] is None:
                    raise ValueError("shared_spatial_func needs one attn or mlp mixer in each stage it shares")
                shared = self.build_mixer(arch[0][0], dim, tokens)
            for kind, depth in arch:
                for _ in range(depth):
                    mixer = shared if shared is not None else self.build_mixer(kind, dim, tokens)
                    modules.append(MixingBlock(dim, spatial_func=mixer, drop_path=next(drop_path_rates),
                                               **block_args))
            self.add_module(self.stage_names[i], nn.Sequential(*modules))
            self.feature_info += self.stage_feature_info(i, dim, patch_size * 2 ** i)
        self.norm2 = norm_layer(dim)
        self.init_head(dim, num_classes, global_pool)
        for name, module in self.named_modules():
            _init_weights(module, name)

    def build_mixer(self, kind: str, dim: int, tokens: int):
        cls, a = SPATIAL_MIXERS[kind], self.mixer_args
        if cls is None:
            return None
        if cls is SpatialAttention:
            return SpatialAttention(dim, a["num_heads"], qkv_bias=a["qkv_bias"], qk_scale=a["qk_scale"],
                                    attn_drop=a["attn_drop"], proj_drop=a["proj_drop"], fused_attn=a["fused_attn"])
        return cls(in_features=tokens, hidden_features=int(tokens * a["token_ratio"]), act_layer=a["act_layer"],
                   drop=a["drop"])

    def drop_path_rates(self, rate: float, num_blocks: int) -> List[float]:
        raise NotImplementedError

    def stage_feature_info(self, index: int, dim: int, reduction: int) -> List[dict]:
        raise NotImplementedError

    def forward_stem(self, x):
        x = self.check_input(x)
        x = self.stem(x).permute(0, 2, 3, 1)  # NCHW -> NHWC token grid
        return self.norm1(x)

    @torch.jit.ignore
    def flops_sequence(self) -> List[nn.Module]:
        body = [m for name in self.stage_names for m in getattr(self, name)]
        return [self.stem, self.norm1, *body, self.norm2, self.head]


class Spach(_SpachNet):
    """Single-stage SPACH: patch-16 stem, the mixing blocks of ``net_arch`` (a list of ``(mixer, depth)``;
    mixer ``'attn'``, ``'mlp'`` or ``'pass'`` for conv) at one resolution, mean pool, linear head. Stochastic
    depth is the same rate in every block, as in the original. Feature levels are the blocks (the last three
    by default for ``features_only``, as timm's ViT)."""

    stage_names = ["blocks"]
    norm_every_level = True
    default_out_indices = 3

    def __init__(self, net_arch=None, patch_size=16, **kwargs):
        super().__init__(net_arch=net_arch, patch_size=patch_size, **kwargs)

    def drop_path_rates(self, rate, num_blocks):
        return [rate] * num_blocks

    def stage_feature_info(self, index, dim, reduction):
        return [dict(num_chs=dim, reduction=reduction, module=f"blocks.{i}") for i in range(len(self.blocks))]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem|^norm1", blocks=[(r"^blocks\.(\d+)", None), (r"^norm2", (99999,))])

    @torch.jit.ignore
    def feature_levels(self) -> List[nn.Module]:
        return list(self.blocks)

    def keep_levels(self, count: int):
        self.blocks = self.blocks[:count]

    def forward_features(self, x):
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = self.run_level(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm2(x)


class SpachMS(_SpachNet):
    """Multi-stage SPACH: patch-4 stem, four stages (``layer1``..``layer4``), each after the first opened
    by a 2x2 stride-2 conv + GroupNorm(1) that doubles the width; stochastic depth decays linearly from 0
    at the first block to ``drop_path_rate`` at the last. Feature levels are the four stage outputs.

    ``net_arch`` is four lists of ``(mixer, depth)``; a stage may mix kinds (hybrids: conv then attention).
    """

    stage_names = ["layer1", "layer2", "layer3", "layer4"]
    share_first_stage = False

    def __init__(self, net_arch=None, patch_size=4, **kwargs):
        super().__init__(net_arch=net_arch, patch_size=patch_size, **kwargs)

    def drop_path_rates(self, rate, num_blocks):
        return [rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]

    def stage_feature_info(self, index, dim, reduction):
        return [dict(num_chs=dim, reduction=reduction, module=f"layer{index + 1}")]

    __jit_unused_properties__ = ["stages"]

    @property
    def stages(self) -> List[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem|^norm1",
                    blocks=r"^layer(\d+)" if coarse else [(r"^layer(\d+)\.(\d+)", None), (r"^norm2", (99999,))])

    @torch.jit.ignore
    def feature_levels(self) -> List[nn.Module]:
        return self.stages

    def keep_levels(self, count: int):
        for i in range(count, 4):
            setattr(self, f"layer{i + 1}", nn.Sequential())

    def forward_features(self, x):
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.stages:
                x = self.run_level(stage, x)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
        return self.norm2(x)


# --- the named configurations -----------------------------------------------------------------------------

_SS = dict(img_size=224, patch_size=16, token_ratio=0.5)
_MS = dict(img_size=224, patch_size=4, token_ratio=0.5)

# name -> architecture (+ published ImageNet-1k top-1, paper name, release file where there is one)
SPACH_CONFIGS = register_configs({
    # single-stage, patch 16
    "spach_xxs_patch16_224_conv": dict(_SS, hidden_dim=384, num_heads=12, channel_ratio=2.0, net_arch=[("pass", 12)]),
    "spach_xxs_patch16_224_attn": dict(_SS, hidden_dim=192, num_heads=6, channel_ratio=2.0, net_arch=[("attn", 12)]),
    "spach_xxs_patch16_224_mlp": dict(_SS, hidden_dim=384, num_heads=12, channel_ratio=2.0, net_arch=[("mlp", 12)]),
    "spach_xs_patch16_224_conv": dict(_SS, hidden_dim=384, num_heads=12, channel_ratio=2.0, net_arch=[("pass", 24)]),
    "spach_xs_patch16_224_attn": dict(_SS, hidden_dim=384, num_heads=12, channel_ratio=2.0, net_arch=[("attn", 12)]),
    "spach_xs_patch16_224_mlp": dict(_SS, hidden_dim=384, num_heads=12, channel_ratio=2.0, net_arch=[("mlp", 24)]),
    "spach_s_patch16_224_conv": dict(_SS, hidden_dim=512, num_heads=16, channel_ratio=3.0, net_arch=[("pass", 24)]),
    "spach_s_patch16_224_attn": dict(_SS, hidden_dim=512, num_heads=16, channel_ratio=3.0, net_arch=[("attn", 12)]),
    "spach_s_patch16_224_mlp": dict(_SS, hidden_dim=512, num_heads=16, channel_ratio=3.0, net_arch=[("mlp", 24)]),
    # multi-stage, patch 4
    "spach_ms_xxs_patch4_224_conv": dict(
        _MS, hidden_dim=64, num_heads=2, channel_ratio=2.0,
        net_arch=[[("pass", 2)], [("pass", 2)], [("pass", 6)], [("pass", 2)]],
        paper_name="SPACH-Conv-MS-XXS", top1=73.1, weights="spach_ms_conv_xxs.pth"),
    "spach_ms_xxs_patch4_224_attn": dict(
        _MS, hidden_dim=32, num_heads=1, channel_ratio=2.0,
        net_arch=[[("pass", 2)], [("attn", 2)], [("attn", 6)], [("attn", 2)]],
        paper_name="SPACH-Trans-MS-XXS", top1=65.4, weights="spach_ms_trans_xxs.pth"),
    "spach_ms_xxs_patch4_224_mlp": dict(
        _MS, hidden_dim=64, num_heads=2, channel_ratio=2.0,
        net_arch=[[("pass", 2)], [("mlp", 2)], [("mlp", 6)], [("mlp", 2)]],
        paper_name="SPACH-MLP-MS-XXS", top1=74.5, weights="spach_ms_mlp_xxs.pth"),
    "spach_ms_xs_patch4_224_conv": dict(
        _MS, hidden_dim=96, num_heads=3, channel_ratio=2.0,
        net_arch=[[("pass", 3)], [("pass", 4)], [("pass", 12)], [("pass", 3)]]),
    "spach_ms_xs_patch4_224_attn": dict(
        _MS, hidden_dim=64, num_heads=2, channel_ratio=2.0,
        net_arch=[[("pass", 3)], [("attn", 4)], [("attn", 12)], [("attn", 3)]]),
    "spach_ms_xs_patch4_224_mlp": dict(
        _MS, hidden_dim=96, num_heads=3, channel_ratio=2.0,
        net_arch=[[("pass", 3)], [("mlp", 4)], [("mlp", 12)], [("mlp", 3)]]),
    "spach_ms_xs_patch4_224_hybrid": dict(
        _MS, hidden_dim=96, num_heads=3, channel_ratio=2.0,
        net_arch=[[("pass", 3)], [("pass", 4)], [("pass", 2), ("attn", 10)], [("pass", 1), ("attn", 2)]]),
    "spach_ms_s_patch4_224_conv": dict(
        _MS, hidden_dim=128, num_heads=4, channel_ratio=3.0,
        net_arch=[[("pass", 3)], [("pass", 4)], [("pass", 12)], [("pass", 3)]],
        paper_name="SPACH-Conv-MS-S", top1=81.6, weights="spach_ms_conv_s.pth"),
    "spach_ms_s_patch4_224_attn": dict(
        _MS, hidden_dim=96, num_heads=3, channel_ratio=3.0,
        net_arch=[[("pass", 3)], [("attn", 4)], [("attn", 12)], [("attn", 3)]],
        paper_name="SPACH-Trans-MS-S", top1=82.9, weights="spach_ms_trans_s.pth"),
    "spach_ms_s_patch4_224_mlp": dict(
        _MS, hidden_dim=128, num_heads=4, channel_ratio=3.0,
        net_arch=[[("pass", 3)], [("mlp", 4)], [("mlp", 12)], [("mlp", 3)]],
        paper_name="SPACH-MLP-MS-S", top1=82.1, weights="spach_ms_mlp_s.pth"),
    "spach_ms_s_patch4_224_hybrid": dict(
        _MS, hidden_dim=128, num_heads=4, channel_ratio=3.0,
        net_arch=[[("pass", 3)], [("pass", 2), ("attn", 2)], [("pass", 2), ("attn", 10)], [("pass", 1), ("attn", 2)]],
        paper_name="SPACH-Hybrid-MS-S", top1=83.7, weights="spach_ms_hybrid_s.pth"),
    # Hybrid-MS-S+ : the hybrid MS-S with the four-convolution stem
    "spach_ms_s_patch4_224_hybrid_plus": dict(
        _MS, hidden_dim=128, num_heads=4, channel_ratio=3.0, stem_type="conv4",
        net_arch=[[("pass", 3)], [("pass", 2), ("attn", 2)], [("pass", 2), ("attn", 10)], [("pass", 1), ("attn", 2)]],
        paper_name="SPACH-Hybrid-MS-S+", top1=83.9, weights="spach_ms_hybrid_s+.pth"),
}, FamilyOptions(recorded=("stem_type", "shared_spatial_func")))


def _network_cls(name: str):
    return SpachMS if len(stage_archs(SPACH_CONFIGS[name]["net_arch"])) > 1 else Spach


def _cfg(name: str) -> dict:
    row = SPACH_CONFIGS[name]
    stride = row["patch_size"] * (8 if _network_cls(name) is SpachMS else 1)
    return model_cfg(
        url=WEIGHTS_URL_PREFIX + row["weights"] if row.get("weights") else "",
        pool_size=(row["img_size"] // stride, row["img_size"] // stride),
        fixed_input_size=any(kind == "mlp" for stage in stage_archs(row["net_arch"]) for kind, _ in stage),
        first_conv="stem.proj.0" if row.get("stem_type") == "conv4" else "stem.proj",
        description=row.get("paper_name"), paper_ids="arXiv:2108.13002",
        paper_name="A Battle of Network Structures: An Empirical Study of CNN, Transformer, and MLP",
        origin_url="https://github.com/microsoft/SPACH")


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in SPACH_CONFIGS})


def _create(variant: str, pretrained: bool = False, **kwargs):
    return build_model(_network_cls(variant), variant, pretrained, **kwargs)


# --- single-stage -------------------------------------------------------------------------------------
@register_model
def spach_xxs_patch16_224_conv(pretrained=False, **kwargs) -> Spach:
    return _create("spach_xxs_patch16_224_conv", pretrained, **kwargs)


@register_model
def spach_xxs_patch16_224_attn(pretrained=False, **kwargs) -> Spach:
    return _create("spach_xxs_patch16_224_attn", pretrained, **kwargs)


@register_model
def spach_xxs_patch16_224_mlp(pretrained=False, **kwargs) -> Spach:
    return _create("spach_xxs_patch16_224_mlp", pretrained, **kwargs)


@register_model
def spach_xs_patch16_224_conv(pretrained=False, **kwargs) -> Spach:
    return _create("spach_xs_patch16_224_conv", pretrained, **kwargs)


@register_model
def spach_xs_patch16_224_attn(pretrained=False, **kwargs) -> Spach:
    return _create("spach_xs_patch16_224_attn", pretrained, **kwargs)


@register_model
def spach_xs_patch16_224_mlp(pretrained=False, **kwargs) -> Spach:
    return _create("spach_xs_patch16_224_mlp", pretrained, **kwargs)


@register_model
def spach_s_patch16_224_conv(pretrained=False, **kwargs) -> Spach:
    return _create("spach_s_patch16_224_conv", pretrained, **kwargs)


@register_model
def spach_s_patch16_224_attn(pretrained=False, **kwargs) -> Spach:
    return _create("spach_s_patch16_224_attn", pretrained, **kwargs)


@register_model
def spach_s_patch16_224_mlp(pretrained=False, **kwargs) -> Spach:
    return _create("spach_s_patch16_224_mlp", pretrained, **kwargs)


# --- multi-stage --------------------------------------------------------------------------------------
@register_model
def spach_ms_xxs_patch4_224_conv(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_xxs_patch4_224_conv", pretrained, **kwargs)


@register_model
def spach_ms_xxs_patch4_224_attn(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_xxs_patch4_224_attn", pretrained, **kwargs)


@register_model
def spach_ms_xxs_patch4_224_mlp(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_xxs_patch4_224_mlp", pretrained, **kwargs)


@register_model
def spach_ms_xs_patch4_224_conv(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_xs_patch4_224_conv", pretrained, **kwargs)


@register_model
def spach_ms_xs_patch4_224_attn(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_xs_patch4_224_attn", pretrained, **kwargs)


@register_model
def spach_ms_xs_patch4_224_mlp(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_xs_patch4_224_mlp", pretrained, **kwargs)


@register_model
def spach_ms_xs_patch4_224_hybrid(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_xs_patch4_224_hybrid", pretrained, **kwargs)


@register_model
def spach_ms_s_patch4_224_conv(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_s_patch4_224_conv", pretrained, **kwargs)


@register_model
def spach_ms_s_patch4_224_attn(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_s_patch4_224_attn", pretrained, **kwargs)


@register_model
def spach_ms_s_patch4_224_mlp(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_s_patch4_224_mlp", pretrained, **kwargs)


@register_model
def spach_ms_s_patch4_224_hybrid(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_s_patch4_224_hybrid", pretrained, **kwargs)


@register_model
def spach_ms_s_patch4_224_hybrid_plus(pretrained=False, **kwargs) -> SpachMS:
    return _create("spach_ms_s_patch4_224_hybrid_plus", pretrained, **kwargs)
