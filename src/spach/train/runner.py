"""``spach train`` / ``spach eval``: resolve the configuration, build the run, loop.

:func:`run` reads like the recipe: the flags and config files become one frozen
:class:`~spach.train.config.RunConfig` (:func:`~spach.train.config.resolve_config`); :func:`build_run` builds the
output folder and its owner, the data, the model, the training step and the resume from it, each room taking the
section it needs; then either one evaluation / throughput pass, or per epoch train, evaluate and save.
"""
import json
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
from ..files import open_own
from ..runtime import device as devices
from ..runtime.device import DistInfo
from . import faults
from .checkpoint import BEST_NAME, CHECKPOINT_NAME, atomic_save, get_rng_state
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
from .process import configure_process
from .resume import Resumed, check_eval_classes, resume

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
    reading = Reading(cfg.optim.batch_size, cfg.output.seed, cfg.output.dist_eval, cfg.eval_only)
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


def _gather_rng(dist_info):
    state = get_rng_state()
    if dist_info.distributed:
        states = [None] * dist_info.world_size
        torch.distributed.all_gather_object(states, state)
        return state, states
    return state, [state]


def _source(cfg: RunConfig, key: str, flag: str) -> str:
    source = cfg.sources.get(key, "default")
    return flag if source == "command line" else source


def _run(cfg: RunConfig, dist_info, lock, start) -> int:
    run = build_run(cfg, dist_info, lock, start)
    if cfg.eval_only:
        return _evaluate_only(run)
    data, step, out = run.data, run.step, cfg.output
    epochs = cfg.optim.epochs
    start_epoch, max_accuracy = run.resumed.start_epoch, run.resumed.max_accuracy
    if start_epoch >= epochs:
        logger.info(f"{out.output_dir} already holds {start_epoch} of {epochs} epochs: nothing to train "
                    f"(raise --epochs to continue, or pass another --output_dir)")
        logger.info(f"Max accuracy: {max_accuracy:.2f}%")
        return 0
    logger.info(f"Start training for {epochs} epochs on {run.dist.world_size} x {run.device.type} "
                f"(amp {cfg.device.amp}), {data.n_train} train / {data.n_val} val images, {len(data.class_names)} classes")
    last_good = run.resumed.last_good
    steps = len(data.loader_train)
    # the trackers' step axis: optimizer steps since the run began, carried on by a resume
    global_step = run.resumed.steps_done or start_epoch * steps
    metrics = build_metrics(cfg, run.save, run.dist.is_main, run.resumed.tracking)
    # the ids of tracked runs not open now (a tracker left off on this resume, or switched off by a failure) are
    # kept too, so that a later resume with it on continues its run
    tracking = {**run.resumed.tracking, **metrics.run_ids()}
    epoch_times = []
    start_time = time.time()
    failed = True
    try:
        for epoch in range(start_epoch, epochs):
            faults.set_epoch(epoch)
            faults.point("epoch")
            data.sampler_train.set_epoch(epoch)
            t_epoch = time.time()
            later = epochs - epoch - 1

            def run_eta(epoch_left, epoch_s, later=later):  # later epochs take what the finished ones took
                return epoch_left + later * (sum(epoch_times) / len(epoch_times) if epoch_times else epoch_s)

            base = global_step
            train_stats = train_one_epoch(
                step, data.loader_train, epoch, run.schedule, batch_transform=data.batch_transform,
                channels_last=cfg.device.channels_last, print_freq=out.print_freq, is_main=run.dist.is_main,
                show_progress=run.show_progress, last_good=last_good, log_interval=out.log_interval,
                on_log=(lambda n, scalars: metrics.log_step(base + n, scalars)) if metrics else None,
                run_eta=run_eta)
            global_step += steps
            test_stats, ema_stats = _evaluate_epoch(run)
            improved = test_stats["acc1"] > max_accuracy
            max_accuracy = max(max_accuracy, test_stats["acc1"])
            epoch_times.append(time.time() - t_epoch)
            mean = sum(epoch_times) / len(epoch_times)
            logger.info(f"Max accuracy: {max_accuracy:.2f}%  epoch time: {format_duration(epoch_times[-1])}  "
                        f"eta: {format_duration(mean * later)} ({later} epochs left)")
            rng, rng_all = _gather_rng(run.dist)
            log_stats = _log_stats(run, epoch, train_stats, test_stats, ema_stats)
            if run.save:
                last_good = _save_epoch(run, epoch, log_stats, max_accuracy, improved, rng, rng_all,
                                        tracking=tracking, global_step=global_step)
            if metrics:  # after the checkpoint: nothing a tracker does can cost one
                metrics.log_epoch(epoch, global_step, {**log_stats, "max_accuracy": max_accuracy,
                                                       "epoch_time": epoch_times[-1]})
                if run.save:
                    metrics.artifacts([os.path.join(out.output_dir, name) for name in
                                       (CONFIG_NAME, "log.txt", *((BEST_NAME,) if improved else ()))])
        failed = False
    finally:
        metrics.close(failed)
    total = time.time() - start_time
    logger.info(f"Training time {total:.0f}s ({total / 60:.1f} min); max accuracy {max_accuracy:.2f}%"
                + (f"; weights in {out.output_dir}" if run.save else ""))
    return 0


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


def _save_epoch(run: Run, epoch, log_stats, max_accuracy, improved, rng, rng_all, tracking, global_step) -> str:
    """checkpoint.pth (and best.pth when the accuracy improved), then log.txt's line; rank 0 writes, every rank
    learns whether it worked. Returns the checkpoint now to restart from."""
    step, folder = run.step, run.cfg.output.output_dir
    error = None
    if run.dist.is_main:
        state = {
            "model": step.model.state_dict(),
            "optimizer": step.optimizer.state_dict(),
            "lr_scheduler": run.schedule.state_dict(),
            "epoch": epoch,
            "model_ema": step.ema.module.state_dict() if step.ema is not None else None,
            "scaler": step.scaler.state_dict() if step.scaler is not None else None,
            "args": run.cfg.checkpoint_args(),
            "max_accuracy": max_accuracy,
            "sampler_epoch": epoch + 1,
            "rng": rng,
            "rng_per_rank": rng_all,
            "class_names": list(run.data.class_names),
            "world_size": run.dist.world_size,
            "log_stats": log_stats,  # restores log.txt's line after a kill between the two writes
            "tracking": tracking,  # the W&B / MLflow runs a resume continues
            "global_step": global_step,
        }
        try:
            # checkpoint.pth last: it is the commit point. A kill before it reruns this epoch, which
            # rewrites best.pth; the other order could leave best.pth an epoch behind for good.
            if improved:
                atomic_save(state, os.path.join(folder, BEST_NAME))
            atomic_save(state, os.path.join(folder, CHECKPOINT_NAME))
        except CheckpointError as e:
            error = str(e)
        del state
    error = devices.broadcast_object(error)
    if error:
        raise CheckpointError(error + " Training stopped so that no epoch goes unsaved.")
    if run.dist.is_main:
        log = os.path.join(folder, "log.txt")
        with os.fdopen(open_own(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what="log file"), "a") as f:
            f.write(json.dumps(log_stats) + "\n")
    return os.path.join(folder, CHECKPOINT_NAME)
