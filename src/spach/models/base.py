"""What every model family of this package shares: the timm model API, the input contract, the config table and
the timm registration.

A family module (``spach.py``; ``smlp.py`` and ``shiftvit.py`` follow the same shape) adds only its blocks,
one network class derived from :class:`BaseNet`, a table of named configurations registered with
:func:`register_configs`, and ``@register_model`` functions that call :func:`build_model`.

:class:`BaseNet` gives a subclass ``forward`` / ``forward_head(pre_logits=...)`` / ``reset_classifier`` /
``get_classifier`` / ``set_grad_checkpointing`` / ``forward_intermediates`` / ``prune_intermediate_layers``
written once. The subclass provides:

* ``forward_stem(x)`` (starting with :meth:`BaseNet.check_input`: the input checks, kept out of fx graphs),
  ``forward_features(x)``, the final norm named by ``final_norm_name``, and a call of :meth:`BaseNet.init_head`
  once the width is known; :meth:`BaseNet.set_input_contract` states what ``check_input`` enforces;
* ``self.feature_info`` (one dict per feature level), ``feature_levels()`` (the modules producing those levels,
  in forward order) and ``keep_levels(n)``, which ``forward_intermediates`` / ``features_only`` use;
  ``default_out_indices`` are the levels ``features_only`` returns by default (at least three);
* ``flops_sequence()``, the modules of one forward pass in order, for :func:`spach.models.flops.count_flops`
  (each family module states its own cost with ``flops(H, W)``).

Anything in the forward pass that branches on a tensor (its shape, dtype, device) lives in a function registered
with timm's ``register_notrace_function`` (see :func:`check_image_batch`), so that ``torch.fx`` (timm's
``feature_cls='fx'``, torchvision's ``create_feature_extractor``) traces the models.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.utils.checkpoint
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function
from timm.models import build_model_with_cfg, checkpoint_seq
from timm.models._features import feature_take_indices  # timm's own models import it from here too

__all__ = ["WEIGHTS_URL_PREFIX", "BaseNet", "check_image_batch", "MODEL_CONFIGS", "register_configs", "model_cfg",
           "build_model", "META_KEYS", "stochastic_depth_live", "FamilyOptions", "FAMILY_OPTIONS"]


@register_notrace_function  # a leaf of fx graphs: its Python checks run when the graph runs, never while tracing
@torch.jit.ignore
def check_image_batch(x: torch.Tensor, in_chans: int, stride: int, img_size: Tuple[int, int],
                      fixed_size: bool) -> torch.Tensor:
    """``x`` itself, after checking that it is an image batch this model can take (one clear line otherwise)."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected an image batch of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
    H, W = x.shape[2], x.shape[3]
    if H % stride != 0 or W % stride != 0 or H == 0 or W == 0:
        raise ValueError(
            f"input {H}x{W} is not a multiple of this model's total stride {stride}: "
            f"resize or crop to a multiple of {stride} (e.g. {img_size[0]}x{img_size[1]})")
    if fixed_size and (H, W) != tuple(img_size):
        raise ValueError(
            f"this spatial-MLP model mixes a fixed number of tokens and only takes "
            f"{img_size[0]}x{img_size[1]} inputs (got {H}x{W}); create it with img_size={H} "
            f"(new token-MLP weights) or feed {img_size[0]}x{img_size[1]} images")
    return x


class BaseNet(nn.Module):
    """The timm model API over a stem, feature levels, a final norm and a pooled linear head."""

    output_fmt = "NCHW"          # layout of forward_features' output (SPACH: channels-last "NHWC")
    final_norm_name = "norm"     # attribute of the final norm (SPACH keeps the original name, "norm2")
    norm_every_level = False     # forward_intermediates(norm=True): final norm on every level (isotropic nets)
                                 # or on the last level only (hierarchical nets)
    default_out_indices: Union[int, Tuple[int, ...]] = (0, 1, 2, 3)  # features_only levels by default
    citation = ""                # the family's paper as BibTeX (a model card's citation)

    def set_input_contract(self, img_size, in_chans: int, total_stride: int, fixed_input_size: bool):
        """What :meth:`check_input` enforces: channels, a multiple of the total stride, a fixed size if any."""
        self.img_size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.in_chans = in_chans
        self.total_stride = total_stride
        self.fixed_input_size = fixed_input_size
        self.grad_checkpointing = False

    def check_input(self, x):
        if not torch.jit.is_scripting():
            x = check_image_batch(x, self.in_chans, self.total_stride, self.img_size, self.fixed_input_size)
        return x

    # --- head ---------------------------------------------------------------------------------------------
    def init_head(self, num_features: int, num_classes: int, global_pool: str = "avg"):
        self.output_fmt = type(self).output_fmt  # TorchScript reads instance attributes, not class ones
        self.num_features = self.head_hidden_size = num_features
        self.reset_classifier(num_classes, global_pool)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """A new zero-initialised head (``num_classes=0``: none); ``global_pool`` 'avg' or '' (no pooling)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2)) if self.output_fmt == "NHWC" else x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        x = self.forward_features(x)
        return self.forward_head(x)

    # --- training helpers ----------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        # The original recipe decays every tensor of more than one dimension (layer-scale gammas included)
        # and skips biases and norm weights, which the optimiser factory handles by shape.
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def run_level(self, level: nn.Module, x):
        """``level(x)``; with gradient checkpointing, each of its blocks recomputed in the backward pass."""
        if not self.grad_checkpointing:
            return level(x)
        if isinstance(level, nn.Sequential):
            return checkpoint_seq(level, x)
        return torch.utils.checkpoint.checkpoint(level, x, use_reentrant=False)

    # --- feature levels -----------------------------------------------------------------------------------
    @torch.jit.ignore
    def feature_levels(self) -> List[nn.Module]:
        raise NotImplementedError

    @torch.jit.ignore
    def forward_intermediates(self, x, indices: Union[int, List[int], None] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Outputs of the chosen feature levels (``indices``: None all, n the last n, a list those), NCHW by
        default, and the final features (``forward_features``' output)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        levels = self.feature_levels()
        take, last = feature_take_indices(len(levels), indices)
        final_norm = getattr(self, self.final_norm_name)
        x = self.forward_stem(x)
        intermediates = []
        for i, level in enumerate(levels[:last + 1] if stop_early else levels):
            x = self.run_level(level, x)
            if i in take:
                y = final_norm(x) if norm and (self.norm_every_level or i == len(levels) - 1) else x
                if output_fmt != self.output_fmt:
                    y = y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y.permute(0, 2, 3, 1)
                intermediates.append(y.contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return final_norm(x), intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Drop the levels after the last one taken (and the final norm / head): a backbone for features."""
        take, last = feature_take_indices(len(self.feature_levels()), indices)
        self.keep_levels(last + 1)
        if prune_norm:
            setattr(self, self.final_norm_name, nn.Identity())
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def keep_levels(self, count: int):
        """Keep only the first ``count`` feature levels."""
        raise NotImplementedError

    def forward_stem(self, x):
        """The stem's output, after :meth:`check_input`."""
        raise NotImplementedError


# --- the table of named configurations --------------------------------------------------------------------
MODEL_CONFIGS: Dict[str, dict] = {}
"""Every registered name -> its architecture keyword arguments and, under :data:`META_KEYS`, its published
result (``paper_name``, ``top1``) and release file (``weights``). Families add their table with
:func:`register_configs`."""

META_KEYS = ("paper_name", "top1", "weights")

# where the original repository's release files live (SPACH, sMLPNet and ShiftViT alike)
WEIGHTS_URL_PREFIX = "https://github.com/microsoft/SPACH/releases/download/v1.0/"


def stochastic_depth_live(drop: nn.Module) -> bool:
    """Whether ``drop`` (a block's DropPath, or the Identity that stands for rate 0) would drop anything now."""
    return drop.training and getattr(drop, "drop_prob", 0.0) > 0


@dataclass(frozen=True)
class FamilyOptions:
    """The constructor options of a family that a weights file must agree with: each family declares its own
    (:func:`register_configs`), so that nothing outside the family module names them."""

    # options a file records beside its weights (a training run's flags, an export's metadata) that rebuild the
    # right variant: ones whose weights differ (SPACH's stem, shared mixers) and ones whose do not (an activation)
    recorded: Tuple[str, ...] = ()
    # the string options that choose a variant: name -> (default, choices); a command line offers the choices
    variants: Dict[str, Tuple[object, Tuple[str, ...]]] = field(default_factory=dict)
    # the options a file's state_dict fixes by itself (ShiftViT's normalization: BatchNorm keeps running stats)
    from_weights: Optional[Callable[[Dict[str, torch.Tensor]], dict]] = None


FAMILY_OPTIONS: Dict[str, FamilyOptions] = {}
"""Every registered name -> its family's :class:`FamilyOptions`."""


def register_configs(table: Dict[str, dict], options: Optional[FamilyOptions] = None) -> Dict[str, dict]:
    for name in table:
        if name in MODEL_CONFIGS:
            raise ValueError(f"model name {name!r} is registered twice")
    MODEL_CONFIGS.update(table)
    FAMILY_OPTIONS.update({name: options or FamilyOptions() for name in table})
    return table


def model_cfg(*, url: str = "", input_size=(3, 224, 224), pool_size: Tuple[int, int], first_conv: str,
              fixed_input_size: bool = False, **extra) -> dict:
    """A timm pretrained cfg with this package's defaults (ImageNet-1k, bicubic, crop 0.875, timm's mean/std)."""
    return dict(url=url, num_classes=1000, input_size=input_size, pool_size=pool_size, crop_pct=0.875,
                interpolation="bicubic", fixed_input_size=fixed_input_size, mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv=first_conv, classifier="head", license="mit", **extra)


def build_model(model_cls: Callable[..., BaseNet], variant: str, pretrained: bool = False, **kwargs):
    """The network of ``variant`` from its table entry and ``kwargs`` (which win), with timm's pretrained cfg
    on it and, for ``features_only``, timm's feature-getter wrapper (with the same cfg, as timm's own models)."""
    arch = {k: v for k, v in MODEL_CONFIGS[variant].items() if k not in META_KEYS}
    arch.update(kwargs)
    features_only = bool(arch.get("features_only"))
    feature_cfg = dict(feature_cls="getter", out_indices=model_cls.default_out_indices)
    feature_cfg.update(arch.pop("feature_cfg", None) or {})
    if "output_fmt" in arch:
        feature_cfg["output_fmt"] = arch.pop("output_fmt")
    if not features_only:  # feature options without features_only change nothing, as before
        for key in ("out_indices", "feature_cls"):
            arch.pop(key, None)
    model = build_model_with_cfg(model_cls, variant, pretrained=False, feature_cfg=feature_cfg, **arch)
    if pretrained:
        from .pretrained import load_pretrained_release
        # a features_only model has lost its head and later levels: load the keys it kept
        load_pretrained_release(model, variant, strict=not features_only)
    return model
