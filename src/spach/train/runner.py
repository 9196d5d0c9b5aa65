"""``spach train`` / ``spach eval`` from parsed flags to a trained, checkpointed model.

:mod:`spach.train.setup` builds the run's pieces (threads, data check, loaders, model, the training step,
resume); this module is the loop: evaluate / measure throughput, or per epoch train, evaluate and save.
"""
import json
import logging
import math
import os
import time
from typing import Optional

import torch
from timm.utils import distribute_bn

from ..errors import CheckpointError, SpachError
from ..files import regular_file_problem
from ..runtime import device as devices
from ..weights import read_checkpoint_file, stored_facts
from . import faults
from .args import DEIT_DEFAULTS, DEMO_DEFAULTS
from .checkpoint import BEST_NAME, CHECKPOINT_NAME, atomic_save, get_rng_state
from .engine import evaluate, throughput, train_one_epoch
from .output_lock import OutputDirLock
from .setup import Run, build_run, default_output_dir

__all__ = ["run", "resolve_defaults"]

logger = logging.getLogger("spach.train")
_PLAIN = (str, int, float, bool, type(None))


def _model_drop_path(name) -> Optional[float]:
    from ..models import default_drop_path_rate
    try:
        return default_drop_path_rate(name)
    except KeyError:  # an unknown name is reported when the model is built
        return None


def resolve_defaults(args, ckpt_args: Optional[dict] = None):
    """Fill the flags left at ``None``: from the checkpoint being evaluated (model, input size, crop), else
    the DeiT defaults with ``--data-path``, the demo defaults without."""
    table = DEIT_DEFAULTS if args.data_path else DEMO_DEFAULTS
    args._drop_path_source = "--drop-path" if getattr(args, "drop_path", None) is not None else "recipe default"
    for key, value in table.items():
        if getattr(args, key, None) is None:
            if ckpt_args and key in ("model", "input_size", "crop_pct") and ckpt_args.get(key) is not None:
                value = ckpt_args[key]
            if key == "drop_path":
                own = _model_drop_path(args.model)
                if own is not None:  # the rate the model's original registry trained it with
                    value = own
                    args._drop_path_source = f"{args.model}'s own default"
            setattr(args, key, value)
    if getattr(args, "data_set", "IMNET") not in ("IMNET", "WDS", "HFDS"):
        raise SpachError(
            f"--data-set {args.data_set}: spach reads ImageNet-layout folders (DIR/train/<class>/*, DIR/val/<class>/*) "
            f"and WDS / HFDS shards only: write the {args.data_set} images into that layout, point --data-path at it "
            f"and drop the flag (or pass --data-set IMNET)")
    if getattr(args, "lr_noise", None) is not None:
        raise SpachError("--lr-noise is not supported (the SPACH / DeiT recipe does not use it): drop the flag")
    if args.npu:
        if args.device and args.device.split(":")[0] != "npu":
            raise SpachError(f"--npu conflicts with --device {args.device}: pass one of them")
        args.device = args.device or "npu"  # keeps an index: --npu --device npu:1
    return args


def _plain_args(args) -> dict:
    out = {}
    for k, v in vars(args).items():
        if k.startswith("_"):
            continue
        if isinstance(v, (list, tuple)):
            v = [x for x in v if isinstance(x, _PLAIN)]
        elif not isinstance(v, _PLAIN):
            v = str(v)
        out[k] = v
    return out


def _gather_rng(dist_info):
    state = get_rng_state()
    if dist_info.distributed:
        states = [None] * dist_info.world_size
        torch.distributed.all_gather_object(states, state)
        return state, states
    return state, [state]


def run(args) -> int:
    from ..weights import local_weights
    from .args import check_flag_combinations
    try:
        check_flag_combinations(args)
    except ValueError as e:
        raise SpachError(str(e)) from None
    for flag in ("resume", "finetune", "teacher_path"):  # URLs, as the original accepts: downloaded once, cached
        if getattr(args, flag, None):
            setattr(args, flag, local_weights(getattr(args, flag)))
    if args.eval and not args.resume:
        raise SpachError("evaluation needs weights: pass --checkpoint/--resume CKPT (a checkpoint.pth, best.pth or an "
                         "official release .pth)")
    ckpt_args = None
    if args.eval and args.resume:
        problem = regular_file_problem(args.resume)
        if problem:
            raise CheckpointError(f"checkpoint {args.resume} {problem}: pass the path of a .pth file")
    if args.eval or args.throughput:
        # an unreadable file is refused here; a bare state_dict (no 'args') is checked by load_pretrained below
        ck = read_checkpoint_file(args.resume) if args.resume and args.resume.endswith(".pth") else None
        ckpt_args = ck.get("args") if isinstance(ck, dict) and isinstance(ck.get("args"), dict) else None
        if ckpt_args is not None:  # untrusted: out-of-range stored flags are refused, never used
            stored_facts(ckpt_args, args.resume)
        del ck
    resolve_defaults(args, ckpt_args)
    device_kind = devices.resolve_device(args.device)
    dist_info = devices.init_distributed(device_kind, index=devices.requested_index(args.device))
    lock = OutputDirLock(default_output_dir(args)) if default_output_dir(args) else None
    try:
        return _run(args, dist_info, device_kind, lock)
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise SpachError(_loader_death(args, e)) from None
    finally:
        if lock is not None:
            lock.release()
        devices.destroy_distributed()


def _loader_death(args, e: RuntimeError) -> str:
    """One line for a data loader worker killed under the run (the out-of-memory killer, a kill by hand)."""
    detail = str(e).strip().splitlines()[0][:160]
    ckpt = os.path.join(args.output_dir, CHECKPOINT_NAME) if args.output_dir else ""
    if args.eval or args.throughput:
        then = "rerun the same command"
    elif ckpt and os.path.isfile(ckpt):
        then = f"rerunning the same command resumes from {ckpt}"
    else:
        then = "rerunning the same command starts the run again (no checkpoint had been written yet)"
    return (f"a data loader worker died ({detail}); the usual cause is the out-of-memory killer: lower --num_workers "
            f"or --batch-size if it was, then {then}")


def _run(args, dist_info, device_kind, lock) -> int:
    run = build_run(args, dist_info, device_kind, lock)
    if run.eval_only:
        return _evaluate_only(run)
    args, data, step = run.args, run.data, run.step
    start_epoch, max_accuracy = run.resumed.start_epoch, run.resumed.max_accuracy
    if start_epoch >= args.epochs:
        logger.info(f"{args.output_dir} already holds {start_epoch} of {args.epochs} epochs: nothing to train "
                    f"(raise --epochs to continue, or pass another --output_dir)")
        logger.info(f"Max accuracy: {max_accuracy:.2f}%")
        return 0
    tensorboard = getattr(args, "tensorboard", False) and run.save and run.dist.is_main
    if tensorboard:
        from ..tb import require_tensorboard
        require_tensorboard()  # fail before the first epoch, with the install command
    logger.info(f"Start training for {args.epochs} epochs on {run.dist.world_size} x {run.device.type} "
                f"(amp {args.amp}), {data.n_train} train / {data.n_val} val images, {len(data.class_names)} classes")
    last_good = run.resumed.last_good
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        faults.set_epoch(epoch)
        faults.point("epoch")
        data.sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(
            step, data.loader_train, epoch, run.schedule, batch_transform=data.batch_transform,
            channels_last=args.channels_last, print_freq=args.print_freq, is_main=run.dist.is_main,
            show_progress=run.show_progress, last_good=last_good)
        test_stats, ema_stats = _evaluate_epoch(run)
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        logger.info(f"Max accuracy: {max_accuracy:.2f}%")
        rng, rng_all = _gather_rng(run.dist)
        if run.save:
            last_good = _save_epoch(run, epoch, train_stats, test_stats, ema_stats, max_accuracy, improved,
                                    rng, rng_all)
    if tensorboard:
        from ..tb import close_tensorboard_writers
        close_tensorboard_writers()
    total = time.time() - start_time
    logger.info(f"Training time {total:.0f}s ({total / 60:.1f} min); max accuracy {max_accuracy:.2f}%"
                + (f"; weights in {args.output_dir}" if run.save else ""))
    return 0


def _evaluate_only(run: Run) -> int:
    args = run.args
    net = torch.compile(run.model) if args.compile else run.model
    if args.throughput:
        throughput(run.data.loader_val, net, run.device, amp_dtype=run.amp_dtype, channels_last=args.channels_last)
        return 0
    stats = evaluate(run.data.loader_val, net, run.device, amp_dtype=run.amp_dtype, channels_last=args.channels_last,
                     reduce=run.data.dist_eval, is_main=run.dist.is_main, show_progress=run.show_progress)
    logger.info(f"Accuracy of the network on the {stats['n']} test images: {stats['acc1']:.1f}%")
    if not math.isfinite(stats["loss"]):
        raise SpachError(f"evaluating {args.resume} gave a non-finite loss (NaN/inf): its weights or their outputs "
                         f"are not finite (--amp {args.amp}); the accuracy above means nothing: use another "
                         f"checkpoint" + (" or --amp off" if args.amp != "off" else ""))
    return 0


def _evaluate_epoch(run: Run):
    """The model's (and its EMA's) accuracy after an epoch: ``(test_stats, ema_stats or None)``."""
    args, device, ema = run.args, run.device, run.step.ema
    common = dict(amp_dtype=run.amp_dtype, channels_last=args.channels_last, reduce=run.data.dist_eval,
                  is_main=run.dist.is_main)
    if run.dist.distributed:
        # DDP does not broadcast buffers (broadcast_buffers=False), so each rank's BatchNorm running statistics
        # follow its own batches: average them (timm's distribute_bn), so that every rank evaluates, and the
        # checkpoint saves, the same model; --dist-eval then equals one process evaluating that checkpoint
        distribute_bn(run.model, run.dist.world_size, reduce=True)
    test_stats = evaluate(run.data.loader_val, run.step.net, device, show_progress=run.show_progress, **common)
    logger.info(f"Accuracy of the network on the {test_stats['n']} test images: {test_stats['acc1']:.1f}%")
    if ema is None:
        return test_stats, None
    ema_device = next(ema.module.parameters()).device
    if ema_device != device:  # --model-ema-force-cpu: evaluate on the training device, keep it on the CPU
        ema.module.to(device)
    if run.dist.distributed:  # the EMA of each rank's statistics differs the same way
        distribute_bn(ema.module, run.dist.world_size, reduce=True)
    ema_stats = evaluate(run.data.loader_val, ema.module, device, header="EMA ", **common)
    if ema_device != device:
        ema.module.to(ema_device)
    logger.info(f"Accuracy of the EMA model on the {ema_stats['n']} test images: {ema_stats['acc1']:.1f}%")
    return test_stats, ema_stats


def _save_epoch(run: Run, epoch, train_stats, test_stats, ema_stats, max_accuracy, improved, rng, rng_all) -> str:
    """checkpoint.pth (and best.pth when the accuracy improved), then log.txt's line; rank 0 writes, every rank
    learns whether it worked. Returns the checkpoint now to restart from."""
    args, step = run.args, run.step
    error, log_stats = None, None
    if run.dist.is_main:
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items() if k != "n"},
                     **({f"test_ema_{k}": v for k, v in ema_stats.items() if k != "n"} if ema_stats else {}),
                     "epoch": epoch, "n_parameters": run.n_parameters}
        state = {
            "model": step.model.state_dict(),
            "optimizer": step.optimizer.state_dict(),
            "lr_scheduler": run.schedule.state_dict(),
            "epoch": epoch,
            "model_ema": step.ema.module.state_dict() if step.ema is not None else None,
            "scaler": step.scaler.state_dict() if step.scaler is not None else None,
            "args": _plain_args(args),
            "max_accuracy": max_accuracy,
            "sampler_epoch": epoch + 1,
            "rng": rng,
            "rng_per_rank": rng_all,
            "class_names": list(run.data.class_names),
            "world_size": run.dist.world_size,
            "log_stats": log_stats,  # restores log.txt's line after a kill between the two writes
        }
        try:
            # checkpoint.pth last: it is the commit point. A kill before it reruns this epoch, which
            # rewrites best.pth; the other order could leave best.pth an epoch behind for good.
            if improved:
                atomic_save(state, os.path.join(args.output_dir, BEST_NAME))
            atomic_save(state, os.path.join(args.output_dir, CHECKPOINT_NAME))
        except CheckpointError as e:
            error = str(e)
        del state
    error = devices.broadcast_object(error)
    if error:
        raise CheckpointError(error + " Training stopped so that no epoch goes unsaved.")
    if run.dist.is_main:
        with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(log_stats) + "\n")
        if getattr(args, "tensorboard", False):
            from ..tb import write_tensorboard_scalars
            write_tensorboard_scalars(os.path.join(args.output_dir, "tensorboard"), log_stats, epoch)
    return os.path.join(args.output_dir, CHECKPOINT_NAME)
