"""``spach train`` / ``spach eval``: resolve the configuration, build the run, loop.

:func:`run` reads like the recipe: the flags and config files become one frozen
:class:`~spach.train.config.RunConfig` (:func:`~spach.train.config.resolve_config`); :func:`build_run` builds the
output folder and its owner, the data, the model, the training step and the resume from it, each room taking the
section it needs; then either one evaluation / throughput pass, or per epoch train, evaluate and save.
"""
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from timm.utils import distribute_bn

from ..errors import CheckpointError, SpachError
from ..runtime import device as devices
from ..runtime.device import DistInfo
from . import faults
from .checkpoint import BEST_NAME, CHECKPOINT_NAME, RECOVERY_NAME
from .config import RunConfig
from .resolve import resolve_run
from .engine import TrainStep, format_duration, train_one_epoch
from .evaluation import evaluate, throughput
from .loaders import Data, Reading, build_data, loader_death
from .model import build_model, build_train_step, finetune
from .optim import CosineSchedule
from .metrics import build_metrics
from .output import CONFIG_NAME, prepare_output, take_output_dir
from .output_lock import OutputDirLock
from .preemption import EXIT_PREEMPTED, Preemption
from .process import configure_process
from .resume import Resumed, check_eval_classes, resume
from .saving import drop_recovery, gather_rng, save_epoch, save_recovery

__all__ = ["run", "build_run", "Run"]

logger = logging.getLogger("spach.train")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass
class Run:
    """Everything a run needs, built by :func:`build_run`."""
    cfg: RunConfig
    dist: DistInfo
    save: bool                                  # checkpoints and logs are written to the output folder
    amp_dtype: Optional[torch.dtype]
    show_progress: bool
    data: Data
    model: torch.nn.Module                      # the bare model (checkpoints hold its state_dict)
    n_parameters: int
    step: Optional[TrainStep] = None            # None when only evaluating
    schedule: Optional[CosineSchedule] = None
    resumed: Optional[Resumed] = None

    @property
    def device(self) -> torch.device:
        return self.dist.device


def run(args, mode: str = "train") -> int:
    """``spach train`` (``mode="train"``; ``--eval`` / ``--throughput`` included) or ``spach eval``."""
    cfg, start = resolve_run(args, mode)
    dist_info = devices.init_distributed(cfg.device.kind, index=cfg.device.index)
    lock = OutputDirLock(cfg.output.output_dir) if cfg.output.output_dir else None
    try:
        return _run(cfg, dist_info, lock, start)
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise SpachError(loader_death(cfg, e)) from None
    finally:
        if lock is not None:
            lock.release()
        devices.destroy_distributed()


def build_run(cfg: RunConfig, dist: DistInfo, lock: Optional[OutputDirLock] = None, start=None) -> Run:
    """The run's pieces in order; ``start``: the opened weights file the run starts from (--finetune, or the
    checkpoint evaluated), read once. The order matters for reproducibility: the model's initial weights, then the
    teacher's, are drawn from the seeded RNG in that order, and a resumed run then replaces the RNG state with the
    checkpoint's."""
    save, owned = prepare_output(cfg.output, dist, cfg.eval_only, lock)
    configure_process(dist, cfg.output.seed, cfg.output.deterministic)
    reading = Reading(cfg.optim.batch_size, cfg.output.seed, cfg.output.dist_eval, cfg.eval_only,
                      cfg.optim.global_batch)
    data = build_data(cfg.data, cfg.aug, reading, dist)
    n_classes = len(data.class_names)
    logger.info(f"Creating model: {cfg.model.model} ({n_classes} classes, input {cfg.data.input_size})")
    logger.info(f"drop path rate {cfg.model.drop_path:g} ({_source(cfg, 'drop_path', '--drop-path')})")
    model = build_model(cfg.model, cfg.data.input_size, n_classes, cfg.device.grad_checkpointing)
    if start is not None and not cfg.eval_only:
        finetune(model, start)
    if start is not None and cfg.eval_only:
        from ..models import load_pretrained
        if not cfg.output.throughput:  # an accuracy is reported: labels must mean what the head's rows mean
            check_eval_classes(start, data.class_names)
        load_pretrained(model, start, use_ema=cfg.output.eval_ema)
    model.to(dist.device)
    if cfg.device.channels_last:
        model.to(memory_format=torch.channels_last)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"number of params: {n_parameters}")
    amp_dtype = _AMP_DTYPES[cfg.device.amp]
    run = Run(cfg, dist, save, amp_dtype, sys.stdout.isatty(), data, model, n_parameters)
    if not cfg.eval_only:
        run.step, run.schedule = build_train_step(cfg, model, n_classes, dist, amp_dtype)
        run.model = run.step.model  # the same module (--sync-bn replaces layers inside it)
        run.resumed = resume(cfg, run.step, dist, save and owned, data.class_names)
    if save:  # every check passed: create the folder (if new), own it, write config.yaml
        take_output_dir(cfg, dist, lock)
    return run


def _source(cfg: RunConfig, key: str, flag: str) -> str:
    source = cfg.sources.get(key, "default")
    return flag if source == "command line" else source


def _run(cfg: RunConfig, dist_info, lock, start) -> int:
    run = build_run(cfg, dist_info, lock, start)
    if cfg.eval_only:
        return _evaluate_only(run)
    out, epochs, resumed = cfg.output, cfg.optim.epochs, run.resumed
    if resumed.start_epoch >= epochs:
        logger.info(f"{out.output_dir} already holds {resumed.start_epoch} of {epochs} epochs: nothing to train "
                    f"(raise --epochs to continue, or pass another --output_dir)")
        logger.info(f"Max accuracy: {resumed.max_accuracy:.2f}%")
        return 0
    o = cfg.optim
    logger.info(f"Start training for {epochs} epochs on {run.dist.world_size} x {run.device.type} "
                f"(amp {cfg.device.amp}), {run.data.n_train} train / {run.data.n_val} val images, "
                f"{len(run.data.class_names)} classes")
    logger.info(f"global batch {o.global_batch} = {o.batch_size} per card"
                + (f" x {o.grad_accum_steps} accumulation" if o.grad_accum_steps > 1 else "")
                + f" x {run.dist.world_size} card(s)")
    stopper = Preemption().install()
    try:
        return _train(run, stopper)
    finally:
        stopper.restore()


class _Loop:
    """The state the epoch loop carries from epoch to epoch (and into recovery checkpoints)."""

    def __init__(self, run: Run):
        resumed = run.resumed
        self.max_accuracy = resumed.max_accuracy
        self.last_good = resumed.last_good
        self.last_log = resumed.last_log  # the last finished epoch's log line (a recovery checkpoint carries it)
        # the trackers' step axis: optimizer steps since the run began, carried on by a resume
        self.global_step = resumed.steps_done or resumed.start_epoch * (len(run.data.loader_train)
                                                                         // run.cfg.optim.grad_accum_steps)
        self.epoch_times = []


def _train(run: Run, stopper: Preemption) -> int:
    cfg, data, out = run.cfg, run.data, run.cfg.output
    epochs, accum, resumed = cfg.optim.epochs, cfg.optim.grad_accum_steps, run.resumed
    loop = _Loop(run)
    metrics = build_metrics(cfg, run.save, run.dist.is_main, resumed.tracking)
    # the ids of tracked runs not open now (a tracker left off on this resume, or switched off by a failure) are
    # kept too, so that a later resume with it on continues its run
    tracking = {**resumed.tracking, **metrics.run_ids()}
    start_time = time.time()
    failed = True
    try:
        for epoch in range(resumed.start_epoch, epochs):
            faults.set_epoch(epoch)
            faults.point("epoch")
            mid = epoch == resumed.start_epoch and resumed.progress is not None
            _start_epoch(run, epoch, resumed.start_samples if mid else 0)
            progress = resumed.progress if mid else None
            steps = (progress.steps_done if progress else 0) + len(data.loader_train) // accum
            t_epoch = time.time() - (progress.elapsed if progress else 0.0)
            later = epochs - epoch - 1

            def run_eta(epoch_left, epoch_s, later=later):  # later epochs take what the finished ones took
                times = loop.epoch_times
                return epoch_left + later * (sum(times) / len(times) if times else epoch_s)

            base = loop.global_step - (progress.steps_done if progress else 0)

            def after_step(done, snapshot, epoch=epoch, steps=steps, base=base):
                stop = stopper.agreed()
                due = out.recovery_interval and done % out.recovery_interval == 0 and done < steps
                if run.save and (stop or due):
                    path = save_recovery(run, epoch, done, snapshot(), loop.max_accuracy, tracking, base + done,
                                         loop.last_log)
                    loop.last_good = path
                if stop:
                    _stopped(run, stopper, epoch, done, steps)
                return stop

            train_stats = train_one_epoch(
                run.step, data.loader_train, epoch, run.schedule, batch_transform=data.batch_transform,
                channels_last=cfg.device.channels_last, print_freq=out.print_freq, is_main=run.dist.is_main,
                show_progress=run.show_progress, last_good=loop.last_good, log_interval=out.log_interval,
                on_log=(lambda n, scalars, base=base: metrics.log_step(base + n, scalars)) if metrics else None,
                run_eta=run_eta, accum=accum, steps=steps, progress=progress, after_step=after_step)
            if train_stats is None:
                failed = False
                return EXIT_PREEMPTED
            loop.global_step = base + steps
            _end_epoch(run, loop, epoch, train_stats, time.time() - t_epoch, later, metrics, tracking)
            if stopper.agreed_now():
                _stopped(run, stopper, epoch + 1, 0, 0)
                failed = False
                return EXIT_PREEMPTED
        failed = False
    finally:
        metrics.close(failed)
    total = time.time() - start_time
    logger.info(f"Training time {total:.0f}s ({total / 60:.1f} min); max accuracy {loop.max_accuracy:.2f}%"
                + (f"; weights in {out.output_dir}" if run.save else ""))
    return 0


def _start_epoch(run: Run, epoch: int, start: int):
    """The sampler (or the shard reader) at ``epoch``, from position ``start`` of its order (a mid-epoch resume)."""
    try:
        run.data.sampler_train.set_epoch(epoch, start)
    except ValueError as e:  # a recovery position the data cannot have (the data changed since it was written)
        raise CheckpointError(f"{run.resumed.last_good} stopped {start} samples into epoch {epoch}, which this data "
                              f"cannot continue ({e}): the data changed since; resume the epoch's start with --resume "
                              f"{os.path.join(run.cfg.output.output_dir, CHECKPOINT_NAME)} --no-auto-resume") from None


def _end_epoch(run: Run, loop: _Loop, epoch, train_stats, epoch_time, later, metrics, tracking):
    """Evaluate, log, save the epoch checkpoint (then drop the recovery checkpoint it supersedes), track."""
    out = run.cfg.output
    test_stats, ema_stats = _evaluate_epoch(run)
    improved = test_stats["acc1"] > loop.max_accuracy
    loop.max_accuracy = max(loop.max_accuracy, test_stats["acc1"])
    loop.epoch_times.append(epoch_time)
    mean = sum(loop.epoch_times) / len(loop.epoch_times)
    logger.info(f"Max accuracy: {loop.max_accuracy:.2f}%  epoch time: {format_duration(epoch_time)}  "
                f"eta: {format_duration(mean * later)} ({later} epochs left)")
    rng, rng_all = gather_rng(run.dist)
    log_stats = _log_stats(run, epoch, train_stats, test_stats, ema_stats)
    loop.last_log = log_stats
    if run.save:
        loop.last_good = save_epoch(run, epoch, log_stats, loop.max_accuracy, improved, rng, rng_all,
                                    tracking=tracking, global_step=loop.global_step)
        drop_recovery(run)
    if metrics:  # after the checkpoint: nothing a tracker does can cost one
        metrics.log_epoch(epoch, loop.global_step, {**log_stats, "max_accuracy": loop.max_accuracy,
                                                    "epoch_time": epoch_time})
        if run.save:
            metrics.artifacts([os.path.join(out.output_dir, name) for name in
                               (CONFIG_NAME, "log.txt", *((BEST_NAME,) if improved else ()))])


def _stopped(run: Run, stopper: Preemption, epoch: int, done: int, steps: int):
    """The one line a stop signal ends the run with: where it stopped and how to continue."""
    if not run.dist.is_main:
        return
    where = f"after step {done}/{steps} of epoch {epoch}" if steps else f"at the end of epoch {epoch - 1}"
    if run.save:
        state = os.path.join(run.cfg.output.output_dir, RECOVERY_NAME if steps else CHECKPOINT_NAME)
        logger.warning(f"{stopper.name}: stopped {where}; the state is in {state}: rerun the same command to "
                       f"continue there (exit status {EXIT_PREEMPTED})")
    else:
        logger.warning(f"{stopper.name}: stopped {where}; nothing is saved (--output_dir ''), a rerun starts "
                       f"afresh (exit status {EXIT_PREEMPTED})")


def _evaluate_only(run: Run) -> int:
    cfg = run.cfg
    channels_last = cfg.device.channels_last
    net = torch.compile(run.model) if cfg.device.compile else run.model
    if cfg.output.throughput:
        throughput(run.data.loader_val, net, run.device, amp_dtype=run.amp_dtype, channels_last=channels_last)
        return 0
    stats = evaluate(run.data.loader_val, net, run.device, amp_dtype=run.amp_dtype, channels_last=channels_last,
                     reduce=run.data.dist_eval, is_main=run.dist.is_main, show_progress=run.show_progress)
    logger.info(f"Accuracy of the network on the {stats['n']} test images: {stats['acc1']:.1f}%")
    if not math.isfinite(stats["loss"]):
        raise SpachError(f"evaluating {cfg.output.resume} gave a non-finite loss (NaN/inf): its weights or their outputs "
                         f"are not finite (--amp {cfg.device.amp}); the accuracy above means nothing: use another "
                         f"checkpoint" + (" or --amp off" if cfg.device.amp != "off" else ""))
    if cfg.output.results_file and run.dist.is_main:
        from .results import append_results, results_row
        append_results(cfg.output.results_file, results_row(cfg, stats, run.n_parameters))
        logger.info(f"results appended to {cfg.output.results_file}")
    return 0


def _evaluate_epoch(run: Run):
    """The model's (and its EMA's) accuracy after an epoch: ``(test_stats, ema_stats or None)``."""
    device, ema = run.device, run.step.ema
    common = dict(amp_dtype=run.amp_dtype, channels_last=run.cfg.device.channels_last, reduce=run.data.dist_eval,
                  is_main=run.dist.is_main)
    # DDP does not broadcast buffers (broadcast_buffers=False), so each rank's BatchNorm running statistics
    # follow its own batches: average them (timm's distribute_bn), so that every rank evaluates, and the
    # checkpoint saves, the same model; --dist-eval then equals one process evaluating that checkpoint.
    # With --sync-bn every rank updates them from the same all-reduced global-batch statistics (equal on every
    # rank, from the same start that DDP broadcast): they are already equal, and so are the EMA's, which follow
    # them; the average would be one all-reduce per BatchNorm buffer for nothing.
    average_bn = run.dist.distributed and not run.cfg.device.sync_bn
    if average_bn:
        distribute_bn(run.model, run.dist.world_size, reduce=True)
    test_stats = evaluate(run.data.loader_val, run.step.net, device, show_progress=run.show_progress, **common)
    logger.info(f"Accuracy of the network on the {test_stats['n']} test images: {test_stats['acc1']:.1f}%")
    if ema is None:
        return test_stats, None
    ema_device = next(ema.module.parameters()).device
    if ema_device != device:  # --model-ema-force-cpu: evaluate on the training device, keep it on the CPU
        ema.module.to(device)
    if average_bn:  # the EMA of each rank's statistics differs the same way
        distribute_bn(ema.module, run.dist.world_size, reduce=True)
    ema_stats = evaluate(run.data.loader_val, ema.module, device, header="EMA ", **common)
    if ema_device != device:
        ema.module.to(ema_device)
    logger.info(f"Accuracy of the EMA model on the {ema_stats['n']} test images: {ema_stats['acc1']:.1f}%")
    return test_stats, ema_stats


def _log_stats(run: Run, epoch, train_stats, test_stats, ema_stats) -> dict:
    """The epoch's line of log.txt (and what the trackers get per epoch)."""
    return {**{f"train_{k}": v for k, v in train_stats.items()},
            **{f"test_{k}": v for k, v in test_stats.items() if k != "n"},
            **({f"test_ema_{k}": v for k, v in ema_stats.items() if k != "n"} if ema_stats else {}),
            "epoch": epoch, "n_parameters": run.n_parameters}
