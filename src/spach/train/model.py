"""The run's networks and its training step: the model (fine-tuned from a file when asked), the distillation
teacher, and the step around them (EMA, DDP / compile, optimizer, schedule, grad scaler, mixup, loss)."""
import logging

import torch

from ..errors import CheckpointError, SpachError
from ..runtime.device import DistInfo
from .config import AugConfig, DistillConfig, ModelConfig, OptimConfig, RunConfig
from .ema import ModelEma
from .engine import TrainStep, build_scaler
from .losses import build_criterion
from .optim import CosineSchedule, build_optimizer

__all__ = ["build_model", "finetune", "build_teacher", "build_train_step", "sync_batchnorm"]

logger = logging.getLogger("spach.train")


def build_model(m: ModelConfig, input_size: int, num_classes: int, grad_checkpointing: bool = False):
    """The network the configuration names, for ``num_classes`` classes at ``input_size``."""
    from ..models import create_model, variant_options
    kwargs = dict(num_classes=num_classes, drop_rate=m.drop, drop_path_rate=m.drop_path, img_size=input_size)
    if m.stem_type:
        kwargs["stem_type"] = m.stem_type
    if m.shared_spatial_func:
        kwargs["shared_spatial_func"] = True
    for key in variant_options(m.model):  # resolved by the configuration (flag, weights file, or default)
        kwargs[key] = getattr(m, key)
    try:
        model = create_model(m.model, **kwargs)
    except ValueError as e:  # an option the architecture cannot take (e.g. --shared-spatial-func on a hybrid)
        raise SpachError(f"--model {m.model}: {e}") from None
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    from ..models.sizes import input_size_problem
    problem = input_size_problem(model, (input_size, input_size), "--input-size")
    if problem:
        raise SpachError(problem)
    return model


def finetune(model, weights):
    """Start from ``weights`` (an opened :class:`~spach.weights.WeightsFile`); a classifier head of another size is
    re-initialised."""
    from ..models.pretrained import check_weight_values, checkpoint_filter_fn
    path = weights.source
    sd = checkpoint_filter_fn(weights.state_dict(), model)
    own = model.state_dict()
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head") + "."  # sMLPNet: mlp_head.0
    for k in [k for k in sd if k.startswith(head)]:
        if k in own and sd[k].shape != own[k].shape:
            logger.info(f"finetune: re-initialising {k} ({tuple(sd[k].shape)} in {path}, {tuple(own[k].shape)} here)")
            del sd[k]
    mis = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if mis:
        raise CheckpointError(f"--finetune {path} does not fit {type(model).__name__}: mis-shaped {', '.join(mis[:4])}; "
                              f"use the same --model (and --input-size for fixed-size MLP models)")
    check_weight_values(sd, model, path)
    result = model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head)]
    if missing:
        raise CheckpointError(f"--finetune {path} lacks {len(missing)} weights of the model ({', '.join(missing[:4])}): "
                              f"it was trained with another --model")


def build_teacher(d: DistillConfig, num_classes, device):
    import timm
    from ..weights import read_state_dict
    try:
        teacher = timm.create_model(d.teacher_model, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:
        raise SpachError(f"unknown --teacher-model {d.teacher_model!r}: {e}") from None
    sd = read_state_dict(d.teacher_path)
    try:
        teacher.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"--teacher-path {d.teacher_path} does not fit {d.teacher_model}: "
                              f"{str(e).splitlines()[0][:300]}") from None
    return teacher.to(device).eval()


def _mixup(aug: AugConfig, num_classes: int):
    if not aug.mixup_active:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, cutmix_minmax=aug.cutmix_minmax,
                 prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode,
                 label_smoothing=aug.smoothing, num_classes=num_classes)


def _schedule(o: OptimConfig) -> CosineSchedule:
    return CosineSchedule(o.effective_lr, o.epochs, o.warmup_epochs, o.warmup_lr, o.min_lr, o.cooldown_epochs,
                          per_step=o.sched_per_step)


def sync_batchnorm(model, model_name: str, dist: DistInfo):
    """``--sync-bn``: ``model`` with its BatchNorm layers synchronised over the process group (in place; see
    :mod:`spach.train.sync_bn`). A model without BatchNorm is refused, in one line naming the fix."""
    from .sync_bn import NATIVE_SYNC_DEVICES, ONE_PROCESS, convert_sync_batchnorm, has_batchnorm
    from ..models import variant_options
    if not has_batchnorm(model):
        fix = (" or train its BatchNorm variant with --norm-layer BN" if "norm_layer" in variant_options(model_name)
               else "")
        raise SpachError(f"--sync-bn: --model {model_name} has no BatchNorm layer (its LayerNorm / GroupNorm "
                         f"normalise each sample on its own and need no synchronisation): drop --sync-bn{fix}")
    if not dist.distributed:  # resolve_config refuses it first; a caller that skipped it gets the same answer
        raise SpachError(ONE_PROCESS)
    n = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    converted = convert_sync_batchnorm(model, dist.device.type)
    kind = ("torch.nn.SyncBatchNorm" if dist.device.type in NATIVE_SYNC_DEVICES else
            f"spach's all-reduce BatchNorm on {dist.device.type}")
    logger.info(f"--sync-bn: {n} BatchNorm layers normalise over the global batch of {dist.world_size} processes "
                f"({kind})")
    return converted


def build_train_step(cfg: RunConfig, model, num_classes: int, dist: DistInfo, amp_dtype):
    """Sync BN, EMA, the DDP / compile wrappers, the optimizer (at the configuration's scaled lr), its schedule,
    the grad scaler, mixup and the loss. Returns ``(TrainStep, CosineSchedule)``; ``TrainStep.model`` is the
    model (with --sync-bn, its BatchNorm layers replaced in place, same state_dict keys)."""
    device, o = dist.device, cfg.optim
    if cfg.device.sync_bn:
        # before the EMA copies the model, so that both hold the same layer types (the EMA is only evaluated:
        # its layers run as plain BatchNorm)
        model = sync_batchnorm(model, cfg.model.model, dist)
    wrapped = model
    if dist.distributed:
        ids = [device.index] if device.type in ("cuda", "npu") else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    ema = None
    if cfg.model.model_ema:
        # after DDP, which gives every rank rank 0's initial weights: each rank's EMA starts from those (before,
        # a rank's EMA began at its own random initialisation, and an EMA evaluated with --dist-eval mixed them)
        ema = ModelEma(model, decay=cfg.model.model_ema_decay,
                       device=torch.device("cpu") if cfg.model.model_ema_force_cpu else None)
    net = torch.compile(wrapped) if cfg.device.compile else wrapped
    logger.info(f"lr {o.lr:g} x global batch {o.global_batch} / 512 = {o.effective_lr:g}")
    optimizer = build_optimizer(model, device, name=o.opt, lr=o.effective_lr, weight_decay=o.weight_decay,
                                eps=o.opt_eps, betas=o.opt_betas, momentum=o.momentum)
    mixup_fn = _mixup(cfg.aug, num_classes)
    d = cfg.distill
    teacher = build_teacher(d, num_classes, device) if d.distillation_type != "none" else None
    criterion = build_criterion(mixup_fn is not None, cfg.aug.smoothing, teacher, d.distillation_type,
                                d.distillation_alpha, d.distillation_tau)
    step = TrainStep(model=model, net=net, criterion=criterion, optimizer=optimizer, device=device,
                     amp_dtype=amp_dtype, scaler=build_scaler(device, amp_dtype), mixup_fn=mixup_fn,
                     clip_grad=o.clip_grad, ema=ema, track_grad_norm=cfg.output.log_grad_norm)
    return step, _schedule(o)
