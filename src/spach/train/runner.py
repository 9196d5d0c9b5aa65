"""``spach train`` / ``spach eval`` from parsed flags to a trained, checkpointed model.

Read top to bottom: resolve defaults and the device, check the data, build loaders, model, optimizer,
schedule; resume; then either evaluate / measure throughput, or loop over epochs (train, evaluate, save).
"""
import json
import logging
import os
import random
import sys
import time
from typing import Optional

import numpy as np
import torch

from ..errors import CheckpointError, DataError, SpachError
from ..data import (EvalShardSampler, RASampler, ShuffleSampler, TolerantImageFolder, build_transform, check_dataset,
                    prepare_demo_dataset)
from ..data.demo import DEMO_NAME
from ..weights import read_checkpoint_file
from . import device as devices
from . import faults
from .args import DEIT_DEFAULTS, DEMO_DEFAULTS
from .checkpoint import BEST_NAME, CHECKPOINT_NAME, atomic_save, get_rng_state, load_checkpoint, set_rng_state
from .ema import ModelEma
from .engine import DistillationLoss, evaluate, throughput, train_one_epoch
from .optim import CosineSchedule, build_optimizer

__all__ = ["run", "resolve_defaults", "setup_logging"]

logger = logging.getLogger("spach.train")
_PLAIN = (str, int, float, bool, type(None))


def setup_logging(is_main: bool, log_file: Optional[str] = None):
    root = logging.getLogger("spach")
    for h in list(root.handlers):
        if getattr(h, "_spach", False):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.INFO)
    root.propagate = False
    out = logging.StreamHandler(sys.stdout if is_main else sys.stderr)
    out.setLevel(logging.INFO if is_main else logging.WARNING)
    out.setFormatter(logging.Formatter("%(message)s"))
    out._spach = True
    root.addHandler(out)
    if log_file and is_main:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
        fh._spach = True
        root.addHandler(fh)


def resolve_defaults(args, ckpt_args: Optional[dict] = None):
    """Fill the flags left at ``None``: from the checkpoint being evaluated (model, input size, crop), else
    the DeiT defaults with ``--data-path``, the demo defaults without."""
    table = DEIT_DEFAULTS if args.data_path else DEMO_DEFAULTS
    for key, value in table.items():
        if getattr(args, key, None) is None:
            if ckpt_args and key in ("model", "input_size", "crop_pct") and ckpt_args.get(key) is not None:
                value = ckpt_args[key]
            setattr(args, key, value)
    if getattr(args, "data_set", "IMNET") != "IMNET":
        raise SpachError(
            f"--data-set {args.data_set}: spach reads ImageNet-layout folders only (DIR/train/<class>/*, "
            f"DIR/val/<class>/*): write the {args.data_set} images into that layout, point --data-path at it and "
            f"drop the flag (or pass --data-set IMNET)")
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


def _seed_everything(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def _default_output_dir(args) -> str:
    data = os.path.basename(os.path.normpath(args.data_path)) if args.data_path else DEMO_NAME
    return os.path.join("output", f"{args.model}-{data}")


def _check_output_dir(path: str):
    if os.path.exists(path) and not os.path.isdir(path):
        raise SpachError(f"--output_dir {path} is a file: pass a folder path (it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SpachError(f"cannot create --output_dir {path} ({e.strerror}): pick a writable folder") from None
    if not os.access(path, os.W_OK):
        raise SpachError(f"--output_dir {path} is not writable: fix its permissions or pick another folder")


def _remove_stale_temp_files(folder: str):
    """Temp files of a checkpoint write that was killed midway (the checkpoint itself is intact)."""
    for name in os.listdir(folder):
        if name.endswith(".tmp") and (name.startswith(f".{CHECKPOINT_NAME}.") or name.startswith(f".{BEST_NAME}.")):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def _build_model(args, num_classes: int):
    from ..models import create_model
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                  img_size=args.input_size)
    if getattr(args, "stem_type", None):
        kwargs["stem_type"] = args.stem_type
    if getattr(args, "shared_spatial_func", False):
        kwargs["shared_spatial_func"] = True
    try:
        model = create_model(args.model, **kwargs)
    except ValueError as e:  # an option the architecture cannot take (e.g. --shared-spatial-func on a hybrid)
        raise SpachError(f"--model {args.model}: {e}") from None
    if getattr(args, "grad_checkpointing", False):
        model.set_grad_checkpointing(True)
    stride = getattr(model, "total_stride", 1)
    if args.input_size % stride:
        ok = max(stride, args.input_size // stride * stride)
        raise SpachError(f"--input-size {args.input_size} does not fit {args.model}: it needs a multiple of its total "
                         f"stride {stride} (e.g. --input-size {ok})")
    return model


def _finetune(model, path: str):
    from ..models.pretrained import checkpoint_filter_fn
    from ..weights import read_state_dict
    sd = checkpoint_filter_fn(read_state_dict(path), model)
    own = model.state_dict()
    for k in [k for k in sd if k.startswith("head.")]:
        if k in own and sd[k].shape != own[k].shape:
            logger.info(f"finetune: re-initialising {k} ({tuple(sd[k].shape)} in {path}, {tuple(own[k].shape)} here)")
            del sd[k]
    mis = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if mis:
        raise CheckpointError(f"--finetune {path} does not fit {type(model).__name__}: mis-shaped {', '.join(mis[:4])}; "
                              f"use the same --model (and --input-size for fixed-size MLP models)")
    result = model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing:
        raise CheckpointError(f"--finetune {path} lacks {len(missing)} weights of the model ({', '.join(missing[:4])}): "
                              f"it was trained with another --model")


def _loader(dataset, sampler, batch_size, args, drop_last, device):
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type in ("cuda", "npu"), drop_last=drop_last,
        persistent_workers=False)  # fresh workers per epoch, seeded from the (checkpointed) torch RNG


def _gather_rng(dist_info):
    state = get_rng_state()
    if dist_info.distributed:
        states = [None] * dist_info.world_size
        torch.distributed.all_gather_object(states, state)
        return state, states
    return state, [state]


def run(args) -> int:
    from ..weights import local_weights
    for flag in ("resume", "finetune", "teacher_path"):  # URLs, as the original accepts: downloaded once, cached
        if getattr(args, flag, None):
            setattr(args, flag, local_weights(getattr(args, flag)))
    if args.eval and not args.resume:
        raise SpachError("evaluation needs weights: pass --checkpoint/--resume CKPT (a checkpoint.pth, best.pth or an "
                         "official release .pth)")
    ckpt_args = None
    if args.eval and args.resume:
        if not os.path.isfile(args.resume):
            raise CheckpointError(f"checkpoint {args.resume} does not exist: pass the path of a .pth file")
    if args.eval or args.throughput:
        # an unreadable file is refused here; a bare state_dict (no 'args') is checked by load_pretrained below
        ck = read_checkpoint_file(args.resume) if args.resume and args.resume.endswith(".pth") else None
        ckpt_args = ck.get("args") if isinstance(ck, dict) and isinstance(ck.get("args"), dict) else None
        del ck
    resolve_defaults(args, ckpt_args)
    device_kind = devices.resolve_device(args.device)
    dist_info = devices.init_distributed(device_kind, index=devices.requested_index(args.device))
    try:
        return _run(args, dist_info, device_kind)
    finally:
        devices.destroy_distributed()


def _with_current_kernels(saved: dict, optimizer) -> dict:
    """A saved optimizer state with this run's kernel choice (``fused`` / ``foreach`` / ``capturable``):
    ``load_state_dict`` would otherwise bring back the settings of the device that wrote it (foreach AdamW from a
    CPU run resumed on a GPU, or fused kernels on a device without them)."""
    saved_groups = saved.get("param_groups", [])
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(f"the checkpoint's optimizer state has {len(saved_groups)} parameter groups, this run's "
                              f"optimizer {len(optimizer.param_groups)}: it was written by another optimizer setup; "
                              f"start from its weights with --finetune instead of --resume")
    groups = []
    for saved_group, group in zip(saved_groups, optimizer.param_groups):
        saved_group = dict(saved_group)
        for key in ("fused", "foreach", "capturable"):
            if key in group:
                saved_group[key] = group[key]
        groups.append(saved_group)
    return dict(saved, param_groups=groups) if groups else saved


def _run(args, dist_info, device_kind) -> int:
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    is_main = dist_info.is_main
    if args.output_dir is None:
        args.output_dir = _default_output_dir(args)
    save = bool(args.output_dir) and not args.eval and not args.throughput
    if save:
        _check_output_dir(args.output_dir)
        if is_main:
            _remove_stale_temp_files(args.output_dir)
    setup_logging(is_main, os.path.join(args.output_dir, "log_rank0.txt") if save else None)
    show_progress = sys.stdout.isatty()

    amp_dtype = devices.resolve_amp(args.amp, device_kind)
    args.amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # one share of the cores per local process (torch alone would give each process all of them). Loader
        # workers get no core of their own: with the cores to itself, a 2-core run trained 1.4x faster end to end
        # from JPEGs (XXS, 2 workers) and 1.1x on the demo with 2 compute threads than with 1. On a machine busy
        # with other jobs, OMP_WAIT_POLICY=PASSIVE (or a lower OMP_NUM_THREADS) stops OpenMP's spinning threads
        # from competing with them.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        share = cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, share))
    if device.type == "cpu":
        # glibc keeps freed activation buffers for the next step instead of returning them to the kernel and
        # page-faulting them back in (1.07x bf16 / 1.26x fp32 per step at batch 128; SPACH_CPU_TUNING=0: off)
        from ..bench.cpu_tuning import apply_cpu_tuning
        tuned = apply_cpu_tuning(threads=torch.get_num_threads())
        logger.info(f"CPU: {torch.get_num_threads()} compute threads, allocator {tuned.get('allocator', 'default')}"
                    + (" (SPACH_CPU_TUNING=0)" if tuned.get("disabled") else ""))
    if args.deterministic:
        if device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace, read at its first call
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
    _seed_everything(args.seed + rank)

    # ---- data: checked before anything heavy happens
    if args.data_path:
        data_root = args.data_path
    else:
        data_root = prepare_demo_dataset() if is_main else None
        if dist_info.distributed:
            devices.barrier()
            data_root = prepare_demo_dataset()
        logger.info(f"no --data-path: using the embedded MNIST-5k demo dataset at {data_root}")
    eval_only = args.eval or args.throughput
    class_names, samples = check_dataset(data_root, splits=("val",) if eval_only else ("train", "val"))
    samples.setdefault("train", [])
    n_train, n_val = len(samples["train"]), len(samples["val"])
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        if args.batch_size % 2:
            raise SpachError(f"mixup/cutmix need an even --batch-size (got {args.batch_size}): use {args.batch_size + 1}"
                             f" or --mixup 0 --cutmix 0")
    if not (args.eval or args.throughput) and n_train // world < args.batch_size:
        raise DataError(f"{os.path.join(data_root, 'train')} has {n_train} images, fewer than one batch of "
                        f"{args.batch_size} per process x {world} process(es): lower --batch-size to at most "
                        f"{max(1, n_train // world)}")

    mean_std = {}
    train_tf = build_transform(True, args.input_size, aa=args.aa, color_jitter=args.color_jitter,
                               train_interpolation=args.train_interpolation, reprob=args.reprob, remode=args.remode,
                               recount=args.recount, hflip=args.hflip, scale=tuple(args.scale), **mean_std)
    val_tf = build_transform(False, args.input_size, crop_pct=args.crop_pct, **mean_std)
    dataset_train = TolerantImageFolder(samples["train"], class_names, train_tf, strict=args.strict_data)
    batch_transform = None
    if getattr(args, "data_pipeline", "timm") == "fast" and not eval_only:
        from ..data.fast_pipeline import build_fast_train_dataset
        try:
            dataset_train, batch_transform = build_fast_train_dataset(
                samples["train"], class_names, args.input_size, aa=args.aa, hflip=args.hflip, scale=args.scale,
                reprob=args.reprob, remode=args.remode, recount=args.recount, color_jitter=args.color_jitter,
                strict=args.strict_data, interpolation=args.train_interpolation)
        except ValueError as e:
            raise SpachError(f"--data-pipeline fast cannot run these flags ({e}): use --data-pipeline timm") from None
        batch_transform = batch_transform.to(device)
        from ..data import cv_augment
        logger.info("fast data pipeline: " + (
            "OpenCV decoding and RandAugment kernels" if cv_augment.available() else
            "PIL decoding and RandAugment: OpenCV (opencv-python-headless, a spach dependency) did not load; "
            "reinstall it (pip install --force-reinstall opencv-python-headless) for the faster kernels"))
    dataset_val = TolerantImageFolder(samples["val"], class_names, val_tf, strict=args.strict_data)
    if eval_only:
        sampler_train = None
    elif args.repeated_aug:
        sampler_train = RASampler(n_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    else:
        sampler_train = ShuffleSampler(n_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    dist_eval = args.dist_eval and dist_info.distributed
    sampler_val = EvalShardSampler(n_val, world, rank) if dist_eval else EvalShardSampler(n_val, 1, 0)
    loader_train = None if eval_only else _loader(dataset_train, sampler_train, args.batch_size, args, True, device)
    loader_val = _loader(dataset_val, sampler_val, int(1.5 * args.batch_size), args, False, device)

    # ---- model
    logger.info(f"Creating model: {args.model} ({len(class_names)} classes, input {args.input_size})")
    model = _build_model(args, len(class_names))
    if args.finetune and not args.eval:
        _finetune(model, args.finetune)
    if args.eval or args.throughput:
        if args.resume:
            from ..models import load_pretrained
            load_pretrained(model, args.resume, use_ema=args.eval_ema)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"number of params: {n_parameters}")

    if args.eval or args.throughput:
        net = torch.compile(model) if args.compile else model
        if args.throughput:
            throughput(loader_val, net, device, amp_dtype=amp_dtype, channels_last=args.channels_last)
            return 0
        stats = evaluate(loader_val, net, device, amp_dtype=amp_dtype, channels_last=args.channels_last,
                         reduce=dist_eval, is_main=is_main, show_progress=show_progress)
        logger.info(f"Accuracy of the network on the {stats['n']} test images: {stats['acc1']:.1f}%")
        return 0

    model_ema = None
    if args.model_ema:
        model_ema = ModelEma(model, decay=args.model_ema_decay,
                             device=torch.device("cpu") if args.model_ema_force_cpu else None)
    model_without_ddp = model
    if dist_info.distributed:
        ids = [device.index] if device.type in ("cuda", "npu") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    net = torch.compile(model) if args.compile else model

    base_lr = args.lr
    args.lr = base_lr * args.batch_size * world / 512.0
    logger.info(f"lr {base_lr:g} x global batch {args.batch_size * world} / 512 = {args.lr:g}")
    optimizer = build_optimizer(model_without_ddp, args, device)
    schedule = CosineSchedule(args.lr, args.epochs, args.warmup_epochs, args.warmup_lr, args.min_lr,
                              args.cooldown_epochs, per_step=args.sched_per_step)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=len(class_names))
        base_criterion = SoftTargetCrossEntropy()  # smoothing is in the mixed targets
    else:
        mixup_fn = None
        base_criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    teacher = None
    if args.distillation_type != "none":
        teacher = _build_teacher(args, len(class_names), device)
    criterion = DistillationLoss(base_criterion, teacher, args.distillation_type, args.distillation_alpha,
                                 args.distillation_tau)

    # ---- resume: an explicit --resume, else <output_dir>/checkpoint.pth when it exists
    max_accuracy, start_epoch = 0.0, args.start_epoch
    resume = args.resume
    auto = os.path.join(args.output_dir, CHECKPOINT_NAME) if save else ""
    if args.auto_resume and auto and os.path.isfile(auto):
        resume = auto
        logger.info(f"auto resume from {auto}")
    last_good = resume if resume and os.path.isfile(resume) else ""
    if resume:
        ckpt = load_checkpoint(resume)
        from ..models import load_pretrained
        load_pretrained(model_without_ddp, resume)
        if "optimizer" in ckpt and "epoch" in ckpt:
            optimizer.load_state_dict(_with_current_kernels(ckpt["optimizer"], optimizer))
            start_epoch = int(ckpt["epoch"]) + 1
            if model_ema is not None and isinstance(ckpt.get("model_ema"), dict):
                model_ema.module.load_state_dict(ckpt["model_ema"])
            if scaler is not None and isinstance(ckpt.get("scaler"), dict) and ckpt["scaler"]:
                scaler.load_state_dict(ckpt["scaler"])
            max_accuracy = float(ckpt.get("max_accuracy", 0.0))
            per_rank = ckpt.get("rng_per_rank")
            if per_rank and len(per_rank) == world:
                set_rng_state(per_rank[rank])
            elif "rng" in ckpt and world == 1:
                set_rng_state(ckpt["rng"])
            logger.info(f"resumed {resume} at epoch {start_epoch} (max accuracy so far {max_accuracy:.2f}%)")
            if resume == auto and is_main:
                _sync_log(os.path.join(args.output_dir, "log.txt"), start_epoch - 1, ckpt.get("log_stats"))
        del ckpt

    if start_epoch >= args.epochs:
        logger.info(f"{args.output_dir} already holds {start_epoch} of {args.epochs} epochs: nothing to train "
                    f"(raise --epochs to continue, or pass another --output_dir)")
        logger.info(f"Max accuracy: {max_accuracy:.2f}%")
        return 0

    if getattr(args, "tensorboard", False) and save and is_main:
        from ..tb import require_tensorboard
        require_tensorboard()  # fail before the first epoch, with the install command
    logger.info(f"Start training for {args.epochs} epochs on {world} x {device.type} (amp {args.amp}), "
                f"{n_train} train / {n_val} val images, {len(class_names)} classes")
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        faults.set_epoch(epoch)
        faults.point("epoch")
        sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(
            net, criterion, loader_train, optimizer, device, epoch, schedule=schedule, model_ema=model_ema,
            ema_model=model_without_ddp, mixup_fn=mixup_fn, scaler=scaler, amp_dtype=amp_dtype,
            clip_grad=args.clip_grad, print_freq=args.print_freq, channels_last=args.channels_last,
            is_main=is_main, show_progress=show_progress, last_good=last_good, batch_transform=batch_transform)
        test_stats = evaluate(loader_val, net, device, amp_dtype=amp_dtype, channels_last=args.channels_last,
                              reduce=dist_eval, is_main=is_main, show_progress=show_progress)
        logger.info(f"Accuracy of the network on the {test_stats['n']} test images: {test_stats['acc1']:.1f}%")
        ema_stats = None
        if model_ema is not None:
            ema_device = next(model_ema.module.parameters()).device
            if ema_device != device:  # --model-ema-force-cpu: evaluate on the training device, keep it on the CPU
                model_ema.module.to(device)
            ema_stats = evaluate(loader_val, model_ema.module, device, amp_dtype=amp_dtype,
                                 channels_last=args.channels_last, reduce=dist_eval, is_main=is_main, header="EMA ")
            if ema_device != device:
                model_ema.module.to(ema_device)
            logger.info(f"Accuracy of the EMA model on the {ema_stats['n']} test images: {ema_stats['acc1']:.1f}%")
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        logger.info(f"Max accuracy: {max_accuracy:.2f}%")

        rng, rng_all = _gather_rng(dist_info)
        if save:
            error = None
            if is_main:
                log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                             **{f"test_{k}": v for k, v in test_stats.items() if k != "n"},
                             **({f"test_ema_{k}": v for k, v in ema_stats.items() if k != "n"} if ema_stats else {}),
                             "epoch": epoch, "n_parameters": n_parameters}
                state = {
                    "model": model_without_ddp.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": schedule.state_dict(),
                    "epoch": epoch,
                    "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "args": _plain_args(args),
                    "max_accuracy": max_accuracy,
                    "sampler_epoch": epoch + 1,
                    "rng": rng,
                    "rng_per_rank": rng_all,
                    "class_names": list(class_names),
                    "world_size": world,
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
            last_good = os.path.join(args.output_dir, CHECKPOINT_NAME)
            if is_main:
                with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                    f.write(json.dumps(log_stats) + "\n")
                if getattr(args, "tensorboard", False):
                    from ..tb import write_tensorboard_scalars
                    write_tensorboard_scalars(os.path.join(args.output_dir, "tensorboard"), log_stats, epoch)
    if getattr(args, "tensorboard", False) and save and is_main:
        from ..tb import close_tensorboard_writers
        close_tensorboard_writers()
    total = time.time() - start_time
    logger.info(f"Training time {total:.0f}s ({total / 60:.1f} min); max accuracy {max_accuracy:.2f}%"
                + (f"; weights in {args.output_dir}" if save else ""))
    return 0


def _sync_log(path: str, epoch: int, stats: Optional[dict]):
    """Make log.txt end with the line of the checkpoint's ``epoch``: a kill after the checkpoint was written but
    before its line was appended (or in the middle of appending it) would otherwise leave a gap."""
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= epoch:
            kept.append(line)
    if stats and not any(json.loads(line)["epoch"] == epoch for line in kept):
        kept.append(json.dumps(stats))
    if kept != lines:
        with open(path + ".tmp", "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(path + ".tmp", path)


def _build_teacher(args, num_classes, device):
    if not args.teacher_path:
        raise SpachError("--distillation-type soft/hard needs --teacher-path (weights of --teacher-model)")
    import timm
    from ..weights import read_state_dict
    try:
        teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:
        raise SpachError(f"unknown --teacher-model {args.teacher_model!r}: {e}") from None
    sd = read_state_dict(args.teacher_path)
    try:
        teacher.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"--teacher-path {args.teacher_path} does not fit {args.teacher_model}: "
                              f"{str(e).splitlines()[0][:300]}") from None
    return teacher.to(device).eval()
