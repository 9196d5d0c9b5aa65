"""The training loss: label-smoothed or soft-target cross-entropy, and DeiT's distillation from a teacher."""
import torch
import torch.nn.functional as F

from ..models.fused import packed_weights

__all__ = ["DistillationLoss", "build_criterion"]


class DistillationLoss(torch.nn.Module):
    """DeiT's distillation loss with a timm teacher: ``none`` (base criterion only), ``soft`` (KL to the
    teacher's temperature-scaled distribution) or ``hard`` (cross-entropy to the teacher's argmax). SPACH
    models have one head, so its output serves both terms."""

    def __init__(self, base_criterion, teacher=None, distillation_type="none", alpha=0.5, tau=1.0):
        super().__init__()
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs, outputs, labels):
        base = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base
        with torch.no_grad(), packed_weights(self.teacher):  # fixed weights: a spach teacher's fused inference
            teacher_out = self.teacher(inputs)
        if self.distillation_type == "soft":
            T = self.tau
            kd = F.kl_div(F.log_softmax(outputs / T, dim=1), F.log_softmax(teacher_out / T, dim=1),
                          reduction="sum", log_target=True) * (T * T) / outputs.numel()
        else:
            kd = F.cross_entropy(outputs, teacher_out.argmax(dim=1))
        return base * (1 - self.alpha) + kd * self.alpha


def build_criterion(soft_targets: bool, smoothing: float, teacher=None, distillation_type: str = "none",
                    alpha: float = 0.5, tau: float = 1.0) -> DistillationLoss:
    """The training loss, called as ``criterion(samples, outputs, targets)``: soft-target cross-entropy when
    mixup/cutmix make the targets (label smoothing is already inside them), else cross-entropy with label
    smoothing; wrapped in DeiT's distillation loss (``distillation_type`` none: the base loss alone)."""
    if soft_targets:
        from timm.loss import SoftTargetCrossEntropy
        base = SoftTargetCrossEntropy()
    else:
        base = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
    return DistillationLoss(base, teacher, distillation_type, alpha, tau)
