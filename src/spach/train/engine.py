"""The training step and one training epoch (evaluation and inference throughput: :mod:`spach.train.evaluation`).

:func:`train_step` is the one optimizer step of the project: ``spach train`` runs it inside
:func:`train_one_epoch`, and ``spach benchmark`` times it as it is.

The hot path queues work on the device and never waits for it: losses are summed on the device and read
(``.item()``) only every ``print_freq`` steps, where a non-finite loss is also detected. FPS is measured over
the same steps it counts: the clock starts after the warm-up steps, behind a device synchronise, and stops
behind another; the per-rank rates are summed over ranks.
"""
import contextlib
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import DataError, SpachError
from ..runtime.device import all_reduce_sum, autocast, max_memory_gib, synchronize, world_size
from . import faults

__all__ = ["TrainStep", "EpochProgress", "train_step", "build_scaler", "train_one_epoch", "NonFiniteLossError", "format_duration"]

logger = logging.getLogger("spach.train")


class NonFiniteLossError(SpachError):
    """The training loss became NaN or infinite."""

    def __init__(self, msg, epoch=None, step=None, lr=None):
        super().__init__(msg)
        self.epoch, self.step, self.lr = epoch, step, lr


def build_scaler(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """A GradScaler for fp16 autocast (its small range needs the loss scaled); None otherwise."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


@dataclass
class TrainStep:
    """What one optimizer step uses, built once per run (:mod:`spach.train.model`) or per benchmark workload.

    ``model`` is the bare module (what the EMA averages and checkpoints hold); ``net`` is what runs the forward
    pass: the model itself, or the DistributedDataParallel / torch.compile wrapper around it.
    """
    model: nn.Module
    net: nn.Module
    criterion: Callable                      # criterion(samples, outputs, targets), see losses.build_criterion
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype; None: fp32
    scaler: Optional[torch.amp.GradScaler] = None
    mixup_fn: Optional[Callable] = None      # timm Mixup, applied on the device before the forward pass
    clip_grad: Optional[float] = None
    ema: Optional[nn.Module] = None          # ModelEma of ``model``, updated after every optimizer step
    track_grad_norm: bool = False            # keep the gradient norm without clipping (--log-grad-norm)
    grad_norm: Optional[torch.Tensor] = None  # the last step's norm (on the device) when clipping or tracking


def _no_sync(net: nn.Module):
    """DDP's ``no_sync`` (gradients kept local, no all-reduce) around the backward passes of the micro-batches that
    do not step the optimizer; nothing without DDP."""
    ddp = getattr(net, "_orig_mod", net)  # under torch.compile the DDP module is the compiled one's original
    return ddp.no_sync() if hasattr(ddp, "no_sync") else contextlib.nullcontext()


def train_step(step: TrainStep, micro_batches, index: Optional[int] = None, count: int = 1) -> torch.Tensor:
    """One optimizer step over ``count`` micro-batches ``(samples, targets)`` already on the device (a sequence, or
    an iterator that loads each when it is needed): per micro-batch mixup, forward and loss under autocast and
    backward of ``loss / count`` (scaled for fp16), the gradients all-reduced only with the last one; then
    optional gradient clipping, the optimizer update and the EMA update, once. Returns the micro-batches' mean loss
    (detached); nothing here waits for the device. ``index`` is the step's number in its epoch, for the
    fault-injection point between the first forward and backward pass."""
    optimizer, scaler = step.optimizer, step.scaler
    optimizer.zero_grad(set_to_none=True)
    total = None
    for k, (samples, targets) in enumerate(micro_batches):
        last = k == count - 1
        with contextlib.nullcontext() if last else _no_sync(step.net):
            if step.mixup_fn is not None:
                samples, targets = step.mixup_fn(samples, targets)
            with autocast(step.device, step.amp_dtype):
                outputs = step.net(samples)
                loss = step.criterion(samples, outputs, targets)
            if index is not None and k == 0:
                faults.point("step", index)
            part = loss / count if count > 1 else loss
            (scaler.scale(part) if scaler is not None else part).backward()
        total = loss.detach() if total is None else total + loss.detach()
        if last:
            break
    # an infinite bound measures the norm without clipping; the norm stays on the device (read when logged)
    max_norm = step.clip_grad or (float("inf") if step.track_grad_norm else None)
    if scaler is not None:
        if max_norm:
            scaler.unscale_(optimizer)
            step.grad_norm = torch.nn.utils.clip_grad_norm_(step.net.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        if max_norm:
            step.grad_norm = torch.nn.utils.clip_grad_norm_(step.net.parameters(), max_norm)
        optimizer.step()
    if step.ema is not None:
        step.ema.update(step.model)
    return total / count if count > 1 else total


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
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as e:
                raise _loader_error(e) from None
            yield batch
    finally:
        # the loader's workers shut down here, whatever ended the loop (the end, an error, a stop signal, the
        # generator closed): they ignore stop signals (spach.train.loaders), so left to the interpreter's exit,
        # which ends child processes with SIGTERM, they would keep it waiting
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _progress(total, desc, enabled, initial=0):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)


def _acc_dtype(device) -> torch.dtype:
    """float64 for running sums, except on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@dataclass
class EpochProgress:
    """What this rank's part of an epoch has done so far, kept in a mid-epoch recovery checkpoint so that the
    resumed epoch's stats (its line of log.txt) come out as an uninterrupted epoch's: optimizer steps done, the
    sum of their losses, their learning rates, the unreadable images drawn and the training seconds spent."""
    steps_done: int = 0
    loss_sum: float = 0.0
    lrs: list = dataclasses.field(default_factory=list)
    bad_images: int = 0
    elapsed: float = 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)


class _DeviceBatches:
    """The loader's batches moved to the device and finished there (the fast pipeline's normalise and erasing,
    channels-last); counts the unreadable images the loader replaced."""

    def __init__(self, loader, device, batch_transform, channels_last):
        self.it = _batches(loader)
        self.device, self.batch_transform, self.channels_last = device, batch_transform, channels_last
        self.bad_images = 0
        self.batch_size = None

    def close(self):
        self.it.close()

    def take(self, n: int):
        """The next ``n`` micro-batches, each loaded when the step asks for it."""
        for _ in range(n):
            samples, targets, n_bad = next(self.it)
            self.bad_images += int(n_bad.sum())
            self.batch_size = samples.shape[0]
            samples = samples.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.batch_transform is not None:
                samples = self.batch_transform(samples)
            if self.channels_last:
                samples = samples.contiguous(memory_format=torch.channels_last)
            yield samples, targets


class _Window:
    """The steps since the last progress line: their loss on the device, the first non-finite one, their time.
    Every ``print_freq`` / ``log_interval`` steps (and at the epoch's last) :meth:`report` reads them, the only
    host-device sync of the loop; every rank syncs at the same steps (an all-reduce), so all agree on a bad loss."""

    def __init__(self, step, epoch, steps, first, t_epoch, elapsed, *, print_freq, log_interval, on_log, run_eta,
                 bar, is_main, last_good):
        self.step, self.epoch, self.steps, self.first = step, epoch, steps, first
        self.t_epoch, self.elapsed = t_epoch, elapsed
        self.print_freq, self.log_interval = print_freq, log_interval or print_freq
        self.on_log, self.run_eta, self.bar, self.is_main, self.last_good = on_log, run_eta, bar, is_main, last_good
        device = step.device
        self.acc = _acc_dtype(device)
        self.sum = torch.zeros((), device=device, dtype=self.acc)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.start, self.n, self.t = first, 0, time.perf_counter()

    def add(self, i: int, loss_d: torch.Tensor):
        finite = torch.isfinite(loss_d)
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, torch.full_like(self.first_bad, i),
                                     self.first_bad)
        self.sum += loss_d
        self.n += 1

    def report(self, i: int, lr: float, lrs, images_per_step: int):
        last = i + 1 == self.steps
        printing = (i + 1) % self.print_freq == 0 or last
        logging_step = (i + 1) % self.log_interval == 0 or last
        if not (printing or logging_step):
            return
        check = all_reduce_sum(torch.stack([self.sum, (self.first_bad >= 0).to(self.acc)]))
        bad_step = int(self.first_bad.item())
        if check[1].item() > 0 or not math.isfinite(check[0].item()):
            raise _non_finite(self.epoch, bad_step if bad_step >= 0 else self.start, lrs, lr, self.last_good)
        avg = check[0].item() / self.n / world_size()
        now = time.perf_counter()  # the .item() above waited for the device: the window's time is honest
        ips = self.n * images_per_step * world_size() / max(now - self.t, 1e-9)
        self.t = now
        if logging_step and self.on_log is not None:
            step = self.step
            scalars = {"loss": avg, "lr": lr, "images_per_s": ips, "memory_gib": max_memory_gib(step.device),
                       "grad_norm": step.grad_norm.item() if step.grad_norm is not None else None}
            self.on_log(i + 1, {k: v for k, v in scalars.items() if v is not None})
        left = (now - self.t_epoch - self.elapsed) / (i + 1 - self.first) * (self.steps - i - 1)
        eta = _eta(left, self.run_eta(left, now - self.t_epoch + left) if self.run_eta else None)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}", eta=eta)
        elif self.is_main and printing:
            logger.info(f"Epoch: [{self.epoch}]  [{i + 1:>{len(str(self.steps))}}/{self.steps}]  lr: {lr:.6f}  "
                        f"loss: {avg:.4f}  images/s: {ips:.1f}  eta: {eta}  time: {now - self.t_epoch:.1f}s")
        self.sum.zero_()
        self.start, self.n = i + 1, 0


def train_one_epoch(step: TrainStep, data_loader, epoch: int, schedule, *, batch_transform=None,
                    channels_last: bool = False, print_freq: int = 10, fps_warmup_steps: int = 3,
                    is_main: bool = True, show_progress: bool = False, last_good: str = "",
                    log_interval: Optional[int] = None, on_log: Optional[Callable[[int, dict], None]] = None,
                    run_eta: Optional[Callable[[float, float], float]] = None, accum: int = 1,
                    steps: Optional[int] = None, progress: Optional[EpochProgress] = None,
                    after_step: Optional[Callable[[int, Callable[[], EpochProgress]], bool]] = None):
    """One epoch of :func:`train_step` over ``data_loader``, ``accum`` micro-batches per optimizer step, the
    learning rate set by ``schedule`` per optimizer step. ``batch_transform`` finishes batches on the device
    (the fast data pipeline's normalise and random erasing), before mixup. ``last_good`` (the checkpoint a run
    would restart from) goes into the message of a non-finite loss. Every ``log_interval`` optimizer steps
    ``on_log(steps_done_in_epoch, scalars)`` gets the step's loss, lr, images/s, memory and grad norm (main rank).
    ``run_eta(epoch_left_s, epoch_s)`` turns the epoch's remaining and projected seconds into the run's remaining
    seconds, for the progress lines.

    A mid-epoch resume passes the epoch's ``steps`` (optimizer steps in all) and its ``progress`` so far; the
    loader then yields only the remaining batches. After every optimizer step ``after_step(steps_done, snapshot)``
    may write a recovery checkpoint (``snapshot()`` is the progress then) and returns True to stop the epoch
    there: this function then returns None instead of the epoch's stats."""
    step.net.train()
    device, optimizer = step.device, step.optimizer
    progress = progress or EpochProgress()
    first = progress.steps_done
    steps = steps if steps is not None else len(data_loader) // accum
    if steps == 0:
        raise DataError("the training loader has no full batch: lower --batch-size")
    warmup = min(first + fps_warmup_steps, steps - 1)
    acc = _acc_dtype(device)
    loss_sum = torch.full((), progress.loss_sum, device=device, dtype=acc)
    lrs = list(progress.lrs)
    bar = _progress(steps, f"Epoch {epoch}", show_progress and is_main, initial=first)
    t_epoch = time.perf_counter() - progress.elapsed
    window = _Window(step, epoch, steps, first, t_epoch, progress.elapsed, print_freq=print_freq,
                     log_interval=log_interval, on_log=on_log, run_eta=run_eta, bar=bar, is_main=is_main,
                     last_good=last_good)
    t0 = time.perf_counter()
    n_timed = 0
    batches = _DeviceBatches(data_loader, device, batch_transform, channels_last)
    # (an epoch resumed after its last step trains nothing: the optimizer keeps that step's rate)
    lr = schedule.apply(optimizer, epoch, first, steps) if first < steps else (lrs[-1] if lrs else 0.0)

    def snapshot() -> EpochProgress:
        return EpochProgress(i + 1, float(loss_sum.item()), list(lrs), progress.bad_images + batches.bad_images,
                             time.perf_counter() - t_epoch)

    try:
        for i in range(first, steps):
            if schedule.per_step and i > first:
                lr = schedule.apply(optimizer, epoch, i, steps)
            lrs.append(lr)
            loss_d = train_step(step, batches.take(accum), index=i, count=accum).detach().to(acc)
            loss_sum += loss_d
            window.add(i, loss_d)
            if i + 1 == warmup:
                synchronize(device)
                t0 = time.perf_counter()
            if i >= warmup:
                n_timed += batches.batch_size * accum
            if bar is not None:
                bar.update(1)  # host-side only: no device sync
            window.report(i, lr, lrs, batches.batch_size * accum)
            if after_step is not None and after_step(i + 1, snapshot):
                return None
    finally:
        batches.close()
        if bar is not None:
            bar.close()

    synchronize(device)
    t1 = time.perf_counter()
    # the same steps are counted and timed: warm-up steps are out of both
    fps_local = n_timed / (t1 - t0) if t1 > t0 and n_timed else 0.0
    n_bad = progress.bad_images + batches.bad_images
    return _epoch_stats(epoch, steps, lrs, loss_sum, fps_local, n_bad, t1 - t_epoch, acc, device, is_main)


def _non_finite(epoch, bad_step, lrs, lr, last_good) -> "NonFiniteLossError":
    # lrs holds the epoch's rates from its step 0 (a mid-epoch resume restores the earlier ones)
    bad_lr = lrs[bad_step] if 0 <= bad_step < len(lrs) else lr
    return NonFiniteLossError(
        f"training loss became non-finite (NaN/inf) at epoch {epoch}, step {bad_step}, lr {bad_lr:.3g}; "
        f"stopped without saving. " + (f"The last good checkpoint is {last_good}: resume from it with a "
                                       f"lower --lr or --clip-grad 1.0" if last_good else
                                       "No checkpoint was saved yet: lower --lr or set --clip-grad 1.0"),
        epoch=epoch, step=bad_step, lr=bad_lr)


def format_duration(seconds: float) -> str:
    """``1d 02:03:04`` / ``02:03:04``: a run's ETA is read at a glance."""
    seconds = max(int(round(seconds)), 0)
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    text = f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def _eta(epoch_left: float, run_left: Optional[float]) -> str:
    text = f"{format_duration(epoch_left)} (epoch)"
    return text if run_left is None else f"{text} {format_duration(run_left)} (run)"


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
