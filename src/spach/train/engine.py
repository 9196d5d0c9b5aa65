"""The training step, one training epoch, one evaluation pass, and the inference throughput measurement.

:func:`train_step` is the one optimizer step of the project: ``spach train`` runs it inside
:func:`train_one_epoch`, and ``spach benchmark`` times it as it is.

The hot path queues work on the device and never waits for it: losses are summed on the device and read
(``.item()``) only every ``print_freq`` steps, where a non-finite loss is also detected. FPS is measured over
the same steps it counts: the clock starts after the warm-up steps, behind a device synchronise, and stops
behind another; the per-rank rates are summed over ranks.
"""
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, SpachError
from ..models.fused import packed_weights
from ..runtime.device import all_reduce_sum, autocast, synchronize, world_size
from . import faults

__all__ = ["TrainStep", "train_step", "build_criterion", "build_scaler", "train_one_epoch", "evaluate", "throughput",
           "NonFiniteLossError", "DistillationLoss"]

logger = logging.getLogger("spach.train")


class NonFiniteLossError(SpachError):
    """The training loss became NaN or infinite."""

    def __init__(self, msg, epoch=None, step=None, lr=None):
        super().__init__(msg)
        self.epoch, self.step, self.lr = epoch, step, lr


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


def build_scaler(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """A GradScaler for fp16 autocast (its small range needs the loss scaled); None otherwise."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


@dataclass
class TrainStep:
    """What one optimizer step uses, built once per run (:mod:`spach.train.setup`) or per benchmark workload.

    ``model`` is the bare module (what the EMA averages and checkpoints hold); ``net`` is what runs the forward
    pass: the model itself, or the DistributedDataParallel / torch.compile wrapper around it.
    """
    model: nn.Module
    net: nn.Module
    criterion: Callable                      # criterion(samples, outputs, targets), see build_criterion
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype; None: fp32
    scaler: Optional[torch.amp.GradScaler] = None
    mixup_fn: Optional[Callable] = None      # timm Mixup, applied on the device before the forward pass
    clip_grad: Optional[float] = None
    ema: Optional[nn.Module] = None          # ModelEma of ``model``, updated after every optimizer step


def train_step(step: TrainStep, samples: torch.Tensor, targets: torch.Tensor,
               index: Optional[int] = None) -> torch.Tensor:
    """One optimizer step on a batch already on the device: mixup, forward and loss under autocast, backward
    (scaled for fp16), optional gradient clipping, the optimizer update, the EMA update. Returns the loss
    (detached); nothing here waits for the device. ``index`` is the step's number in its epoch, for the
    fault-injection point between the forward and the backward pass."""
    if step.mixup_fn is not None:
        samples, targets = step.mixup_fn(samples, targets)
    with autocast(step.device, step.amp_dtype):
        outputs = step.net(samples)
        loss = step.criterion(samples, outputs, targets)
    if index is not None:
        faults.point("step", index)
    optimizer, scaler = step.optimizer, step.scaler
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if step.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(step.net.parameters(), step.clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if step.clip_grad:
            torch.nn.utils.clip_grad_norm_(step.net.parameters(), step.clip_grad)
        optimizer.step()
    if step.ema is not None:
        step.ema.update(step.model)
    return loss.detach()


def _loader_error(e: Exception) -> Exception:
    """A DataError raised inside a DataLoader worker arrives wrapped with the worker's traceback; keep its
    own message."""
    text = str(e)
    marker = "DataError: "
    if marker in text:
        return DataError(text.rsplit(marker, 1)[1].strip().splitlines()[0])
    return e


def _batches(loader):
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except DataError as e:
            raise _loader_error(e) from None
        yield batch


def _progress(total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)


def _acc_dtype(device) -> torch.dtype:
    """float64 for running sums, except on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def train_one_epoch(step: TrainStep, data_loader, epoch: int, schedule, *, batch_transform=None,
                    channels_last: bool = False, print_freq: int = 10, fps_warmup_steps: int = 3,
                    is_main: bool = True, show_progress: bool = False, last_good: str = ""):
    """One epoch of :func:`train_step` over ``data_loader``, the learning rate set by ``schedule``.
    ``batch_transform`` finishes batches on the device (the fast data pipeline's normalise and random
    erasing), before mixup. ``last_good`` (the checkpoint a run would restart from) goes into the message of a
    non-finite loss."""
    step.net.train()
    device, optimizer = step.device, step.optimizer
    steps = len(data_loader)
    if steps == 0:
        raise DataError("the training loader has no full batch: lower --batch-size")
    warmup = min(fps_warmup_steps, steps - 1)
    lr = schedule.apply(optimizer, epoch, 0, steps)
    acc = _acc_dtype(device)
    loss_sum = torch.zeros((), device=device, dtype=acc)
    window_sum = torch.zeros((), device=device, dtype=acc)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    n_bad_images = 0
    window_start, window_n = 0, 0
    lrs = []
    bar = _progress(steps, f"Epoch {epoch}", show_progress and is_main)
    t_epoch = time.perf_counter()
    t0 = t_epoch
    n_timed = 0
    batch_size = None

    for i, (samples, targets, n_bad) in enumerate(_batches(data_loader)):
        n_bad_images += int(n_bad.sum())
        if schedule.per_step and i:
            lr = schedule.apply(optimizer, epoch, i, steps)
        lrs.append(lr)
        batch_size = samples.shape[0]
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if batch_transform is not None:
            samples = batch_transform(samples)
        if channels_last:
            samples = samples.contiguous(memory_format=torch.channels_last)
        loss = train_step(step, samples, targets, index=i)

        loss_d = loss.detach().to(acc)
        finite = torch.isfinite(loss_d)
        first_bad = torch.where((first_bad < 0) & ~finite, torch.full_like(first_bad, i), first_bad)
        loss_sum += loss_d
        window_sum += loss_d
        window_n += 1

        if i + 1 == warmup:
            synchronize(device)
            t0 = time.perf_counter()
        if i >= warmup:
            n_timed += batch_size

        if bar is not None:
            bar.update(1)  # host-side only: no device sync
        last = i + 1 == steps
        if (i + 1) % print_freq == 0 or last:
            # the only host-device sync of the loop: every print_freq steps (all ranks agree on a bad loss)
            check = torch.stack([window_sum, (first_bad >= 0).to(acc)])
            check = all_reduce_sum(check)
            bad_step = int(first_bad.item())
            if check[1].item() > 0 or not math.isfinite(check[0].item()):
                bad_step = bad_step if bad_step >= 0 else window_start
                bad_lr = lrs[bad_step] if bad_step < len(lrs) else lr
                raise NonFiniteLossError(
                    f"training loss became non-finite (NaN/inf) at epoch {epoch}, step {bad_step}, lr {bad_lr:.3g}; "
                    f"stopped without saving. " + (f"The last good checkpoint is {last_good}: resume from it with a "
                                                   f"lower --lr or --clip-grad 1.0" if last_good else
                                                   "No checkpoint was saved yet: lower --lr or set --clip-grad 1.0"),
                    epoch=epoch, step=bad_step, lr=bad_lr)
            window_avg = check[0].item() / window_n / world_size()
            if bar is not None:
                bar.set_postfix(loss=f"{window_avg:.4f}", lr=f"{lr:.2e}")
            elif is_main:
                logger.info(f"Epoch: [{epoch}]  [{i + 1:>{len(str(steps))}}/{steps}]  lr: {lr:.6f}  "
                            f"loss: {window_avg:.4f}  time: {time.perf_counter() - t_epoch:.1f}s")
            window_sum.zero_()
            window_start, window_n = i + 1, 0

    synchronize(device)
    t1 = time.perf_counter()
    if bar is not None:
        bar.close()
    # the same steps are counted and timed: warm-up steps are out of both
    fps_local = n_timed / (t1 - t0) if t1 > t0 and n_timed else 0.0
    return _epoch_stats(epoch, steps, lrs, loss_sum, fps_local, n_bad_images, t1 - t_epoch, acc, device, is_main)


def _epoch_stats(epoch, steps, lrs, loss_sum, fps_local, n_bad_images, elapsed, acc, device, is_main) -> dict:
    """The epoch's stats summed over ranks (FPS) or averaged (loss), logged on the main rank."""
    totals = all_reduce_sum(torch.tensor([loss_sum.item(), float(steps), fps_local, float(n_bad_images)],
                                         dtype=acc, device=device))
    world = world_size()
    loss_avg = totals[0].item() / totals[1].item()
    fps = totals[2].item()
    bad_total = int(totals[3].item())
    stats = {"lr": sum(lrs) / len(lrs), "loss": loss_avg, "fps": fps, "epoch_time": elapsed,
             "bad_images": bad_total}
    if is_main:
        logger.info(f"Epoch: [{epoch}]  steps: {steps}  lr: {stats['lr']:.6f}  loss: {loss_avg:.4f}  "
                    f"time: {elapsed:.1f}s  FPS: {fps:.2f}")
        if bad_total:
            logger.warning(f"Epoch: [{epoch}] skipped {bad_total} unreadable training images (replaced by other "
                           f"samples; paths logged above; --strict-data makes this an error)")
        logger.info(f"Averaged stats: lr: {stats['lr']:.6f}  loss: {loss_avg:.4f}  FPS: {fps:.2f}  "
                    f"world_size: {world}")
    return stats


@torch.no_grad()
def evaluate(data_loader, model, device, *, amp_dtype=None, channels_last=False, reduce=True, is_main=True,
             header="", show_progress=False):
    """Top-1 / top-5 accuracy (%) and cross-entropy loss over every sample of ``data_loader``. With
    ``reduce`` the per-rank sums are all-reduced (use with a sharding sampler that neither pads nor repeats,
    so the result equals single-process evaluation)."""
    model.eval()
    acc = _acc_dtype(device)
    sums = torch.zeros(3, device=device, dtype=acc)  # correct1, correct5, loss_sum
    n_seen, n_replaced = 0, 0                         # counted on the host: no device round trip per batch
    bar = _progress(len(data_loader), "Test", show_progress and is_main)
    fault = "eval-ema" if header else "eval"
    with packed_weights(model):  # the weights are fixed while evaluating
        for images, target, n_bad in _batches(data_loader):
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                output = model(images)
            output = output.float()
            loss = F.cross_entropy(output, target, reduction="sum")
            k = min(5, output.shape[1])
            top = output.topk(k, dim=1).indices
            hit = top.eq(target[:, None])
            sums += torch.stack([hit[:, :1].sum(), hit.sum(), loss]).to(acc)
            n_seen += target.numel()
            n_replaced += int(n_bad.sum())
            faults.point(fault)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    sums = torch.cat([sums, torch.tensor([n_seen, n_replaced], dtype=acc, device=device)])
    if reduce:
        all_reduce_sum(sums)
    c1, c5, loss_sum, n, bad = sums.tolist()
    n = max(n, 1.0)
    stats = {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss_sum / n, "n": int(n), "bad_images": int(bad)}
    if is_main:
        logger.info(f"* {header}Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")
        if bad:
            logger.warning(f"{int(bad)} unreadable validation images were replaced by other samples")
    return stats


@torch.no_grad()
def throughput(data_loader, model, device, *, amp_dtype=None, channels_last=False, warmup=10, iters=30):
    """Inference images/s on one batch of ``data_loader`` (after ``warmup`` untimed passes)."""
    model.eval()
    images = next(iter(_batches(data_loader)))[0].to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype), packed_weights(model):
        for _ in range(warmup):
            model(images)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(images)
        synchronize(device)
    dt = time.perf_counter() - t0
    ips = iters * images.shape[0] / dt
    logger.info(f"batch_size {images.shape[0]} throughput {ips:.1f} images/s (averaged over {iters} passes after "
                f"{warmup} warm-up passes)")
    return ips
