"""AdamW with DeiT's weight-decay rule, and the cosine learning-rate schedule with warm-up and cool-down."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "fused_adamw_available", "optimizer_kind", "CosineSchedule"]


def param_groups(model: nn.Module, weight_decay: float):
    """Two groups: decay for weight matrices / conv kernels; none for 1-D parameters (norm weights, biases)
    and names in ``model.no_weight_decay()``. The layer-scale gammas (shape [1, 1, C]) are decayed, as in the
    original recipe."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, device: torch.device, *, name: str = "adamw", lr: float,
                    weight_decay: float, eps: float = 1e-8, betas=None, momentum: float = 0.9,
                    fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """The optimizer of ``spach train`` (and of ``spach benchmark``, which times the same step) over
    :func:`param_groups`. AdamW takes the fused kernel (one kernel for all parameters) where the device has
    it: cuda, and cpu with torch >= 2.4 (benchmarks/RESULTS.md, "CPU settings"); elsewhere the foreach
    kernels (none on mps). ``fused=False`` asks for foreach where fused would be the default."""
    groups = param_groups(model, weight_decay)
    name = name.lower()
    if name == "adamw":
        kwargs = dict(lr=lr, eps=eps, betas=tuple(betas) if betas else (0.9, 0.999))
        if (fused is None or fused) and fused_adamw_available(device):
            kwargs["fused"] = True
        else:
            kwargs["foreach"] = device.type != "mps"
        return torch.optim.AdamW(groups, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}")


def fused_adamw_available(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``device``: cuda always, cpu from torch 2.4."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2] if v.isdigit())
        return version >= (2, 4)
    return False


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """``fused``, ``foreach`` or ``for-loop``: the kernels the optimizer's first parameter group runs."""
    group = optimizer.param_groups[0]
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"


@dataclass
class CosineSchedule:
    """timm/DeiT cosine schedule as a pure function of time (in epochs, fractional when ``per_step``), so it
    needs no state to resume: a linear warm-up from ``warmup_lr`` over ``warmup_epochs``, and from there the
    cosine of ``t / epochs`` from ``base_lr`` down to ``min_lr`` (timm's ``CosineLRScheduler`` without warm-up
    prefix: the cosine clock starts at 0, not at the end of the warm-up). ``cooldown_epochs`` at ``min_lr``
    follow ``epochs``; as in DeiT, whose loop stops at ``--epochs``, they are only reached by a run that is
    extended past its planned length.

    DeiT steps it once per epoch (``per_step=False``, the default; DeiT's own loop lags it by one epoch, which
    we do not copy: epoch ``e`` trains at the value at ``e``); ``per_step`` updates it every optimizer step.
    """
    base_lr: float
    epochs: int
    warmup_epochs: float = 20
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: float = 10
    per_step: bool = False

    def lr_at(self, t: float) -> float:
        if t < self.warmup_epochs:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * t / self.warmup_epochs
        if t >= self.epochs:
            return self.min_lr  # cool-down
        progress = t / max(self.epochs, 1)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def time(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        return epoch + step / steps_per_epoch if self.per_step else float(epoch)

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        lr = self.lr_at(self.time(epoch, step, steps_per_epoch))
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self):
        return {"sched": "cosine", **self.__dict__}

    def load_state_dict(self, state):
        pass  # a function of time only; the run's flags define it
