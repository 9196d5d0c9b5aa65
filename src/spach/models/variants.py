"""Every named SPACH configuration, registered with timm, with its pretrained config.

One table (:data:`MODEL_CONFIGS`) holds each architecture and its published ImageNet-1k result; the
``@register_model`` functions below only name them. ``import spach`` (or ``import spach.models``) makes
``timm.create_model('spach_ms_s_patch4_224_conv')`` work.
"""
import difflib
from typing import Dict, List

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet

from .spach import Spach, SpachMS

__all__ = ["MODEL_CONFIGS", "list_models", "model_config", "WEIGHTS_URL_PREFIX", "suggest_model_names"]

WEIGHTS_URL_PREFIX = "https://github.com/microsoft/SPACH/releases/download/v1.0/"

_SS = dict(img_size=224, patch_size=16, token_ratio=0.5)
_MS = dict(img_size=224, patch_size=4, token_ratio=0.5)

# name -> architecture (+ published ImageNet-1k top-1, paper name, release file where there is one)
MODEL_CONFIGS: Dict[str, dict] = {
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
}

_META_KEYS = ("paper_name", "top1", "weights")


def model_config(name: str) -> dict:
    """Architecture keyword arguments of a named model (published metadata stripped)."""
    if name not in MODEL_CONFIGS:
        raise KeyError(unknown_model_message(name))
    return {k: v for k, v in MODEL_CONFIGS[name].items() if k not in _META_KEYS}


def list_models() -> List[str]:
    return list(MODEL_CONFIGS)


def suggest_model_names(name: str, n: int = 3) -> List[str]:
    return difflib.get_close_matches(name, list(MODEL_CONFIGS), n=n, cutoff=0.5)


def unknown_model_message(name: str) -> str:
    close = suggest_model_names(name)
    hint = f"did you mean {', '.join(close)}?" if close else "run `spach models` for the list"
    return f"unknown model {name!r}: {hint}"


def _cfg(name: str) -> dict:
    meta = MODEL_CONFIGS[name]
    file = meta.get("weights")
    return dict(
        url=WEIGHTS_URL_PREFIX + file if file else "",
        description=meta.get("paper_name"),
        num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875, interpolation="bicubic",
        fixed_input_size=any(kind == "mlp" for stage in _stages(meta["net_arch"]) for kind, _ in stage),
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="stem.proj.0" if meta.get("stem_type") == "conv4" else "stem.proj",
        classifier="head", license="mit",
        paper_ids="arXiv:2108.13002", paper_name="A Battle of Network Structures: An Empirical Study of CNN, "
        "Transformer, and MLP", origin_url="https://github.com/microsoft/SPACH",
    )


def _stages(net_arch):
    return net_arch if isinstance(net_arch[0], list) else [net_arch]


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in MODEL_CONFIGS})

# keyword arguments timm's factory may hand an entrypoint that are not architecture arguments
_BUILD_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _create_spach(variant: str, pretrained: bool = False, **kwargs):
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    feature_cls = kwargs.pop("feature_cls", None)  # noqa: F841 - only the getter adapter applies here
    output_fmt = kwargs.pop("output_fmt", "NCHW")
    arch = model_config(variant)
    arch.update(kwargs)
    cls = SpachMS if isinstance(arch["net_arch"][0], list) else Spach
    model = build_model_with_cfg(cls, variant, pretrained=False, **arch)
    if pretrained:
        from .pretrained import load_pretrained_release
        load_pretrained_release(model, variant)
    if features_only:
        n = len(model.feature_info)
        if out_indices is None:
            out_indices = tuple(range(n)) if isinstance(model, SpachMS) else (n - 1,)
        model = FeatureGetterNet(model, out_indices=out_indices, output_fmt=output_fmt)
    return model


# --- single-stage -------------------------------------------------------------------------------------
@register_model
def spach_xxs_patch16_224_conv(pretrained=False, **kwargs):
    return _create_spach("spach_xxs_patch16_224_conv", pretrained, **kwargs)


@register_model
def spach_xxs_patch16_224_attn(pretrained=False, **kwargs):
    return _create_spach("spach_xxs_patch16_224_attn", pretrained, **kwargs)


@register_model
def spach_xxs_patch16_224_mlp(pretrained=False, **kwargs):
    return _create_spach("spach_xxs_patch16_224_mlp", pretrained, **kwargs)


@register_model
def spach_xs_patch16_224_conv(pretrained=False, **kwargs):
    return _create_spach("spach_xs_patch16_224_conv", pretrained, **kwargs)


@register_model
def spach_xs_patch16_224_attn(pretrained=False, **kwargs):
    return _create_spach("spach_xs_patch16_224_attn", pretrained, **kwargs)


@register_model
def spach_xs_patch16_224_mlp(pretrained=False, **kwargs):
    return _create_spach("spach_xs_patch16_224_mlp", pretrained, **kwargs)


@register_model
def spach_s_patch16_224_conv(pretrained=False, **kwargs):
    return _create_spach("spach_s_patch16_224_conv", pretrained, **kwargs)


@register_model
def spach_s_patch16_224_attn(pretrained=False, **kwargs):
    return _create_spach("spach_s_patch16_224_attn", pretrained, **kwargs)


@register_model
def spach_s_patch16_224_mlp(pretrained=False, **kwargs):
    return _create_spach("spach_s_patch16_224_mlp", pretrained, **kwargs)


# --- multi-stage --------------------------------------------------------------------------------------
@register_model
def spach_ms_xxs_patch4_224_conv(pretrained=False, **kwargs):
    return _create_spach("spach_ms_xxs_patch4_224_conv", pretrained, **kwargs)


@register_model
def spach_ms_xxs_patch4_224_attn(pretrained=False, **kwargs):
    return _create_spach("spach_ms_xxs_patch4_224_attn", pretrained, **kwargs)


@register_model
def spach_ms_xxs_patch4_224_mlp(pretrained=False, **kwargs):
    return _create_spach("spach_ms_xxs_patch4_224_mlp", pretrained, **kwargs)


@register_model
def spach_ms_xs_patch4_224_conv(pretrained=False, **kwargs):
    return _create_spach("spach_ms_xs_patch4_224_conv", pretrained, **kwargs)


@register_model
def spach_ms_xs_patch4_224_attn(pretrained=False, **kwargs):
    return _create_spach("spach_ms_xs_patch4_224_attn", pretrained, **kwargs)


@register_model
def spach_ms_xs_patch4_224_mlp(pretrained=False, **kwargs):
    return _create_spach("spach_ms_xs_patch4_224_mlp", pretrained, **kwargs)


@register_model
def spach_ms_xs_patch4_224_hybrid(pretrained=False, **kwargs):
    return _create_spach("spach_ms_xs_patch4_224_hybrid", pretrained, **kwargs)


@register_model
def spach_ms_s_patch4_224_conv(pretrained=False, **kwargs):
    return _create_spach("spach_ms_s_patch4_224_conv", pretrained, **kwargs)


@register_model
def spach_ms_s_patch4_224_attn(pretrained=False, **kwargs):
    return _create_spach("spach_ms_s_patch4_224_attn", pretrained, **kwargs)


@register_model
def spach_ms_s_patch4_224_mlp(pretrained=False, **kwargs):
    return _create_spach("spach_ms_s_patch4_224_mlp", pretrained, **kwargs)


@register_model
def spach_ms_s_patch4_224_hybrid(pretrained=False, **kwargs):
    return _create_spach("spach_ms_s_patch4_224_hybrid", pretrained, **kwargs)


@register_model
def spach_ms_s_patch4_224_hybrid_plus(pretrained=False, **kwargs):
    return _create_spach("spach_ms_s_patch4_224_hybrid_plus", pretrained, **kwargs)
