"""The pieces of a ``spach train`` / ``spach eval`` run, each built by one small function from the parsed flags.

:func:`build_run` calls them in order (threads and CPU tuning, the data check, datasets and loaders, the model,
then for training the step's optimizer / schedule / EMA / scaler / loss, and the resume) and returns a
:class:`Run`; :mod:`spach.train.runner` is the loop over it. The order matters for reproducibility: the model's
initial weights, then the teacher's, are drawn from the seeded RNG in that order, and a resumed run then
replaces the RNG state with the checkpoint's.

:func:`build_datasets` is the seam for another data source: it turns the checked sample lists into the train and
val datasets (and the on-device batch transform of the fast pipeline). Shards (``--data-set WDS`` / ``HFDS``) come
in beside it: :func:`open_shard_source` checks them, :func:`build_shard_datasets` builds their datasets.
"""
import contextlib
import json
import logging
import os
import random
import sys
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from ..data import (EvalShardSampler, RASampler, ShuffleSampler, TolerantImageFolder, build_transform, check_dataset,
                    prepare_demo_dataset)
from ..data.demo import DEMO_NAME
from ..errors import CheckpointError, DataError, SpachError
from ..runtime import device as devices
from ..runtime.device import DistInfo
from ..weights import read_once
from .checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint, set_rng_state
from .ema import ModelEma
from .engine import TrainStep, build_criterion, build_scaler
from .optim import CosineSchedule, build_optimizer
from .output_lock import OutputDirLock
from .resume import check_resume_fields, check_same_run

__all__ = ["Run", "Data", "Resumed", "build_run", "build_data", "mixup_active", "sync_log", "setup_logging",
           "configure_runtime", "prepare_output", "default_output_dir", "data_root", "build_transforms",
           "open_shard_source", "build_shard_datasets", "build_datasets", "build_loaders", "build_model", "finetune",
           "build_teacher", "build_train_step", "resume", "with_current_kernels"]

logger = logging.getLogger("spach.train")


@dataclass
class Data:
    class_names: List[str]
    n_train: int
    n_val: int
    loader_train: Optional[torch.utils.data.DataLoader]  # None when only evaluating
    loader_val: torch.utils.data.DataLoader
    sampler_train: Optional[object]                      # what set_epoch reseeds (the WDS dataset itself)
    batch_transform: Optional[torch.nn.Module]            # the fast pipeline's on-device normalise + erasing
    dist_eval: bool                                       # each rank evaluates its shard; the sums are reduced


@dataclass
class Resumed:
    start_epoch: int = 0
    max_accuracy: float = 0.0
    last_good: str = ""  # the checkpoint a failed run would restart from ("" before the first save)


@dataclass
class Run:
    """Everything a run needs, built by :func:`build_run`."""
    args: object
    dist: DistInfo
    save: bool                                  # checkpoints and logs are written to args.output_dir
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

    @property
    def eval_only(self) -> bool:
        return bool(self.args.eval or self.args.throughput)


class _EarlyLines(logging.Handler):
    """Keeps the lines logged before the output folder exists (it is created only once the flags, the data, the
    model and the checkpoint to resume have been checked), for :func:`attach_log_file` to write first."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def setup_logging(is_main: bool, log_file: Optional[str] = None, defer_file: bool = False):
    """Log to stdout (rank 0) / stderr (warnings of other ranks), and on rank 0 to ``log_file``; with
    ``defer_file`` the file is opened later by :func:`attach_log_file`, with the lines logged until then."""
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
        if defer_file:
            early = _EarlyLines()
            early._spach = True
            root.addHandler(early)
        else:
            attach_log_file(log_file)


def attach_log_file(log_file: str):
    root = logging.getLogger("spach")
    fh = logging.FileHandler(log_file)
    fh.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
    fh._spach = True
    for h in list(root.handlers):
        if isinstance(h, _EarlyLines):
            for record in h.records:
                fh.handle(record)
            root.removeHandler(h)
    root.addHandler(fh)


def build_run(args, dist: DistInfo, device_kind: str, lock: Optional[OutputDirLock] = None) -> Run:
    eval_only = bool(args.eval or args.throughput)
    save, owned = prepare_output(args, dist, eval_only, lock)
    amp_dtype = configure_runtime(args, dist, device_kind)
    data = build_data(args, dist, eval_only)
    logger.info(f"Creating model: {args.model} ({len(data.class_names)} classes, input {args.input_size})")
    logger.info(f"drop path rate {args.drop_path:g} ({getattr(args, '_drop_path_source', '--drop-path')})")
    with read_once():  # a --finetune / --resume file fixes the variant, then gives the weights: read once
        model = build_model(args, len(data.class_names))
        if args.finetune and not args.eval:
            finetune(model, args.finetune)
        if eval_only and args.resume:
            from ..models import load_pretrained
            load_pretrained(model, args.resume, use_ema=args.eval_ema)
    model.to(dist.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"number of params: {n_parameters}")
    run = Run(args, dist, save, amp_dtype, sys.stdout.isatty(), data, model, n_parameters)
    if not eval_only:
        run.step, run.schedule = build_train_step(args, model, len(data.class_names), dist, amp_dtype)
        run.resumed = resume(args, run.step, dist, save and owned, data.class_names)
    if save:  # every check passed: create the folder (if new) and own it
        _take_output_dir(args, dist, lock)
    return run


def default_output_dir(args) -> str:
    """``--output_dir``, set to output/<model>-<dataset> when it was not given."""
    if args.output_dir is None:
        data = os.path.basename(os.path.normpath(args.data_path)) if args.data_path else DEMO_NAME
        args.output_dir = os.path.join("output", f"{args.model}-{data}")
    return args.output_dir


def prepare_output(args, dist: DistInfo, eval_only: bool, lock: Optional[OutputDirLock] = None):
    """Default and check ``--output_dir`` and start logging; returns (whether the run writes checkpoints, whether
    it owns the folder already). A folder that exists may be another run's: its lock is taken now, so a second
    run is refused before any work. A new folder is created (and locked) only once the flags, the data, the
    model and the checkpoint to resume have been checked (:func:`_take_output_dir`): a failed check leaves
    nothing behind."""
    default_output_dir(args)
    save = bool(args.output_dir) and not eval_only
    setup_logging(dist.is_main, os.path.join(args.output_dir, "log_rank0.txt") if save else None, defer_file=save)
    owned = False
    if save:
        _check_output_dir(args.output_dir, create=False)
        lock = lock if lock is not None else OutputDirLock(args.output_dir)
        owned = _on_main(dist, lambda: os.path.isdir(args.output_dir) and bool(lock.acquire()))
    return save, bool(owned)


def _check_output_dir(path: str, create: bool = True):
    """Refuse an --output_dir that cannot be used; create it only with ``create``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SpachError(f"--output_dir {path} is a file: pass a folder path (it is created if missing)")
    if not create:
        parent = os.path.abspath(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise SpachError(f"cannot create --output_dir {path}: {parent} is a file; pick another folder")
        if not os.access(parent, os.W_OK):
            what = "is not writable" if parent == os.path.abspath(path) else f"cannot be created in {parent}"
            raise SpachError(f"--output_dir {path} {what}: fix the permissions or pick another folder")
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SpachError(f"cannot create --output_dir {path} ({e.strerror}): pick a writable folder") from None
    if not os.access(path, os.W_OK):
        raise SpachError(f"--output_dir {path} is not writable: fix its permissions or pick another folder")


def _on_main(dist: DistInfo, fn):
    """``fn()`` on rank 0 (the rank that owns the folder); its result, or the SpachError it raises, reaches every
    rank (the others would otherwise wait forever)."""
    error = result = None
    if dist.is_main:
        try:
            result = fn()
        except SpachError as e:
            error = str(e)
    error, result = devices.broadcast_object((error, result))
    if error:
        raise SpachError(error)
    return result


def _take_output_dir(args, dist: DistInfo, lock: Optional[OutputDirLock]):
    """Create --output_dir and make this run its owner; remove the temp files of a killed write (only the
    owner may: they could be another live run's); start writing log_rank0.txt."""
    lock = lock if lock is not None else OutputDirLock(args.output_dir)

    def take():
        _check_output_dir(args.output_dir)
        lock.acquire()
        _remove_stale_temp_files(args.output_dir)
        attach_log_file(os.path.join(args.output_dir, "log_rank0.txt"))
    _on_main(dist, take)


def _remove_stale_temp_files(folder: str):
    """Temp files of a checkpoint write that was killed midway (the checkpoint itself is intact)."""
    for name in os.listdir(folder):
        if name.endswith(".tmp") and (name.startswith(f".{CHECKPOINT_NAME}.") or name.startswith(f".{BEST_NAME}.")):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def configure_runtime(args, dist: DistInfo, device_kind: str) -> Optional[torch.dtype]:
    """Autocast dtype (written back to ``args.amp``), compute threads and CPU tuning, determinism, seeds.
    Returns the autocast dtype (None: fp32)."""
    device = dist.device
    amp_dtype = devices.resolve_amp(args.amp, device_kind)
    args.amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # one share of the cores per local process (torch alone would give each process all of them). Loader
        # workers get no core of their own: with the cores to itself a 2-core run trains faster with both cores
        # computing (benchmarks/RESULTS.md). On a machine busy with other jobs, OMP_WAIT_POLICY=PASSIVE (or a
        # lower OMP_NUM_THREADS) stops OpenMP's spinning threads from competing with them.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        share = cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, share))
    if device.type == "cpu":
        # glibc keeps freed activation buffers for the next step instead of returning them to the kernel and
        # page-faulting them back in (gain in benchmarks/RESULTS.md; SPACH_CPU_TUNING=0: off)
        from ..runtime.cpu_tuning import apply_cpu_tuning
        tuned = apply_cpu_tuning(threads=torch.get_num_threads())
        logger.info(f"CPU: {torch.get_num_threads()} compute threads, allocator {tuned.get('allocator', 'default')}"
                    + (" (SPACH_CPU_TUNING=0)" if tuned.get("disabled") else ""))
    if args.deterministic:
        if device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace, read at its first call
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
    seed = args.seed + dist.rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
    return amp_dtype


def data_root(args, dist: DistInfo) -> str:
    """``--data-path``, or the embedded demo dataset (prepared once, by rank 0 first)."""
    if args.data_path:
        return args.data_path
    root = prepare_demo_dataset() if dist.is_main else None
    if dist.distributed:
        devices.barrier()
        root = prepare_demo_dataset()
    logger.info(f"no --data-path: using the embedded MNIST-5k demo dataset at {root}")
    return root


def build_data(args, dist: DistInfo, eval_only: bool) -> Data:
    """Check the data before anything heavy happens, then the datasets, samplers and loaders."""
    root = data_root(args, dist)
    splits = ("val",) if eval_only else ("train", "val")
    source = None
    if args.data_set in ("WDS", "HFDS"):
        source = open_shard_source(args, root, splits, eval_only)
        class_names = source.classes
        n_train, n_val = (0 if eval_only else source.count("train")), source.count("val")
    else:
        class_names, samples = check_dataset(root, splits=splits)
        samples.setdefault("train", [])
        n_train, n_val = len(samples["train"]), len(samples["val"])
    if mixup_active(args) and args.batch_size % 2:
        raise SpachError(f"mixup/cutmix need an even --batch-size (got {args.batch_size}): use {args.batch_size + 1}"
                         f" or --mixup 0 --cutmix 0")
    if not eval_only and n_train // dist.world_size < args.batch_size:
        raise DataError(f"{os.path.join(root, 'train')} has {n_train} images, fewer than one batch of "
                        f"{args.batch_size} per process x {dist.world_size} process(es): lower --batch-size to at "
                        f"most {max(1, n_train // dist.world_size)}")
    if source is None:
        dataset_train, dataset_val, batch_transform = build_datasets(args, class_names, samples, dist.device,
                                                                     eval_only)
    else:
        (dataset_train, dataset_val), batch_transform = build_shard_datasets(args, source, dist, eval_only), None
    loader_train, sampler_train, loader_val, dist_eval = build_loaders(args, dataset_train, dataset_val, n_train,
                                                                       n_val, dist, eval_only)
    return Data(list(class_names), n_train, n_val, loader_train, loader_val, sampler_train, batch_transform,
                dist_eval)


def mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_transforms(args):
    """The DeiT train transform and the eval preset, as the flags set them: ``(train_tf, val_tf)``."""
    train_tf = build_transform(True, args.input_size, aa=args.aa, color_jitter=args.color_jitter,
                               train_interpolation=args.train_interpolation, reprob=args.reprob, remode=args.remode,
                               recount=args.recount, hflip=args.hflip, scale=tuple(args.scale))
    return train_tf, build_transform(False, args.input_size, crop_pct=args.crop_pct)


def open_shard_source(args, root: str, splits, eval_only: bool):
    """The checked ``--data-set WDS`` / ``HFDS`` source at ``root`` (class names, sample counts per split)."""
    if not args.data_path:
        raise SpachError(f"--data-set {args.data_set} needs --data-path DIR: the folder of the shards (or drop "
                         f"--data-set to train on the demo data)")
    if getattr(args, "data_pipeline", "timm") == "fast" and not eval_only:
        raise SpachError(f"--data-pipeline fast reads ImageFolders only: use --data-pipeline timm with "
                         f"--data-set {args.data_set}")
    from ..data.shards import open_source
    return open_source(args.data_set, root, splits)


def build_shard_datasets(args, source, dist: DistInfo, eval_only: bool):
    """The train and val datasets of a shard ``source``: ``(dataset_train, dataset_val)``. WDS datasets split
    themselves over ranks (and loader workers); HFDS ones are map-style and go through the samplers of
    :func:`build_loaders` like an ImageFolder."""
    train_tf, val_tf = build_transforms(args)
    dist_eval = args.dist_eval and dist.distributed
    dataset_train = None
    if not eval_only:
        dataset_train = source.dataset("train", train_tf, train=True, strict=args.strict_data,
                                       num_replicas=dist.world_size, rank=dist.rank, seed=args.seed,
                                       batch_size=args.batch_size, repeats=3 if args.repeated_aug else 1)
    dataset_val = source.dataset("val", val_tf, train=False, strict=args.strict_data,
                                 num_replicas=dist.world_size if dist_eval else 1, rank=dist.rank if dist_eval else 0)
    return dataset_train, dataset_val


def build_datasets(args, class_names, samples, device: torch.device, eval_only: bool):
    """The train and val datasets from the checked ``samples`` (split -> [(path, class index)]), and the batch
    transform that finishes training batches on ``device`` (None with the timm pipeline). Returns
    ``(dataset_train, dataset_val, batch_transform)``; ``dataset_train`` is unused when ``eval_only``."""
    train_tf, val_tf = build_transforms(args)
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
    return dataset_train, dataset_val, batch_transform


def build_loaders(args, dataset_train, dataset_val, n_train: int, n_val: int, dist: DistInfo, eval_only: bool):
    """Samplers (repeated-augmentation or shuffling shards for training, exact shards for evaluation) and
    loaders. Returns ``(loader_train, sampler_train, loader_val, dist_eval)``; the train pair is None when
    ``eval_only``. A streaming (WDS) dataset orders and splits itself: no sampler, and ``sampler_train`` is the
    dataset, whose ``set_epoch`` reshuffles its shards."""
    world, rank = dist.world_size, dist.rank
    streaming = isinstance(dataset_val, torch.utils.data.IterableDataset)
    if eval_only:
        sampler_train = None
    elif streaming:
        sampler_train = dataset_train
    elif args.repeated_aug:
        sampler_train = RASampler(n_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    else:
        sampler_train = ShuffleSampler(n_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    dist_eval = args.dist_eval and dist.distributed
    if streaming:
        sampler_val = None
    else:
        sampler_val = EvalShardSampler(n_val, world, rank) if dist_eval else EvalShardSampler(n_val, 1, 0)
    loader_train = None if eval_only else _loader(dataset_train, None if streaming else sampler_train,
                                                  args.batch_size, args, True, dist.device)
    loader_val = _loader(dataset_val, sampler_val, int(1.5 * args.batch_size), args, False, dist.device)
    return loader_train, sampler_train, loader_val, dist_eval


def _loader(dataset, sampler, batch_size, args, drop_last, device):
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type in ("cuda", "npu"), drop_last=drop_last,
        persistent_workers=False)  # fresh workers per epoch, seeded from the (checkpointed) torch RNG


def build_model(args, num_classes: int):
    from ..models import create_model
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                  img_size=args.input_size)
    if getattr(args, "stem_type", None):
        kwargs["stem_type"] = args.stem_type
    if getattr(args, "shared_spatial_func", False):
        kwargs["shared_spatial_func"] = True
    _variant_options(args, kwargs)
    try:
        model = create_model(args.model, **kwargs)
    except ValueError as e:  # an option the architecture cannot take (e.g. --shared-spatial-func on a hybrid)
        raise SpachError(f"--model {args.model}: {e}") from None
    if getattr(args, "grad_checkpointing", False):
        model.set_grad_checkpointing(True)
    from ..models.sizes import input_size_problem
    problem = input_size_problem(model, (args.input_size, args.input_size), "--input-size")
    if problem:
        raise SpachError(problem)
    return model


def _variant_options(args, kwargs):
    """The model's variant flags (ShiftViT's ``--norm-layer`` / ``--act-layer``) into ``kwargs``. A weights file the
    run starts from (``--finetune``, or ``--resume`` with ``--eval``) fixes what the flags leave open; one that
    contradicts a flag stops here. The choices are recorded in ``args`` (and so in the checkpoints), so a resume
    checks them."""
    from ..models import arch_from_checkpoint, variant_options
    options = variant_options(args.model)
    given = {k: getattr(args, k, None) for k in ("norm_layer", "act_layer") if getattr(args, k, None)}
    foreign = [f"--{k.replace('_', '-')}" for k in given if k not in options]
    if foreign:
        raise SpachError(f"{' / '.join(foreign)} chooses a ShiftViT variant (shiftvit_* models); {args.model} has no "
                         f"such option: leave {' and '.join(foreign)} out")
    if not options:
        return
    kwargs.update(given)
    start = args.finetune if args.finetune and not args.eval else (args.resume if args.eval and args.resume else None)
    if start and not str(start).startswith(("http://", "https://")):
        arch_from_checkpoint(args.model, start, bool(args.eval and args.eval_ema), kwargs,
                             spell=lambda key, value: f"--{key.replace('_', '-')}" + (f" {value}" if value else ""))
    for key, (default, _) in options.items():
        setattr(args, key, kwargs.setdefault(key, default))


def finetune(model, path: str):
    from ..weights import read_state_dict
    from ..models.pretrained import checkpoint_filter_fn
    sd = checkpoint_filter_fn(read_state_dict(path), model)
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
    result = model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head)]
    if missing:
        raise CheckpointError(f"--finetune {path} lacks {len(missing)} weights of the model ({', '.join(missing[:4])}): "
                              f"it was trained with another --model")


def build_teacher(args, num_classes, device):
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


def build_train_step(args, model, num_classes: int, dist: DistInfo, amp_dtype):
    """EMA, the DDP / compile wrappers, the optimizer (lr scaled by the global batch), its schedule, the grad
    scaler, mixup and the loss. Returns ``(TrainStep, CosineSchedule)``; ``args.lr`` becomes the scaled lr."""
    device, world = dist.device, dist.world_size
    ema = None
    if args.model_ema:
        ema = ModelEma(model, decay=args.model_ema_decay,
                       device=torch.device("cpu") if args.model_ema_force_cpu else None)
    wrapped = model
    if dist.distributed:
        ids = [device.index] if device.type in ("cuda", "npu") else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    net = torch.compile(wrapped) if args.compile else wrapped

    base_lr = args.lr
    args.lr = base_lr * args.batch_size * world / 512.0
    logger.info(f"lr {base_lr:g} x global batch {args.batch_size * world} / 512 = {args.lr:g}")
    optimizer = build_optimizer(model, device, name=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                eps=args.opt_eps, betas=args.opt_betas, momentum=args.momentum)
    schedule = CosineSchedule(args.lr, args.epochs, args.warmup_epochs, args.warmup_lr, args.min_lr,
                              args.cooldown_epochs, per_step=args.sched_per_step)
    scaler = build_scaler(device, amp_dtype)

    mixup_fn = None
    if mixup_active(args):
        from timm.data import Mixup
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    teacher = build_teacher(args, num_classes, device) if args.distillation_type != "none" else None
    criterion = build_criterion(mixup_fn is not None, args.smoothing, teacher, args.distillation_type,
                                args.distillation_alpha, args.distillation_tau)
    step = TrainStep(model=model, net=net, criterion=criterion, optimizer=optimizer, device=device,
                     amp_dtype=amp_dtype, scaler=scaler, mixup_fn=mixup_fn, clip_grad=args.clip_grad, ema=ema)
    return step, schedule


def resume(args, step: TrainStep, dist: DistInfo, owned: bool, class_names) -> Resumed:
    """An explicit --resume, else <output_dir>/checkpoint.pth when it exists: weights, optimizer, EMA, scaler,
    best accuracy and each rank's RNG state. The checkpoint must continue this run (:func:`check_same_run`)
    and its fields are checked before use (:func:`check_resume_fields`). Only a folder this run owned from its
    start is looked in (``owned``): one created since then is another run's, which the lock then refuses."""
    out = Resumed(start_epoch=args.start_epoch)
    path = args.resume
    auto = os.path.join(args.output_dir, CHECKPOINT_NAME) if owned else ""
    if args.auto_resume and auto and os.path.isfile(auto):
        path = auto
        logger.info(f"auto resume from {auto}")
    out.last_good = path if path and os.path.isfile(path) else ""
    if not path:
        return out
    ckpt = load_checkpoint(path)
    check_same_run(ckpt, path, args, class_names, auto=path == auto)
    from ..models import load_pretrained
    load_pretrained(step.model, path)
    check_resume_fields(ckpt, path, dist.world_size)
    if "optimizer" in ckpt and "epoch" in ckpt:
        with _field(path, "optimizer"):
            step.optimizer.load_state_dict(with_current_kernels(ckpt["optimizer"], step.optimizer))
        out.start_epoch = int(ckpt["epoch"]) + 1
        if step.ema is not None and isinstance(ckpt.get("model_ema"), dict):
            with _field(path, "model_ema"):
                step.ema.module.load_state_dict(ckpt["model_ema"])
        if step.scaler is not None and isinstance(ckpt.get("scaler"), dict) and ckpt["scaler"]:
            with _field(path, "scaler"):
                step.scaler.load_state_dict(ckpt["scaler"])
        out.max_accuracy = float(ckpt.get("max_accuracy", 0.0))
        per_rank = ckpt.get("rng_per_rank")
        with _field(path, "rng"):
            if per_rank and len(per_rank) == dist.world_size:
                set_rng_state(per_rank[dist.rank])
            elif "rng" in ckpt and dist.world_size == 1:
                set_rng_state(ckpt["rng"])
        logger.info(f"resumed {path} at epoch {out.start_epoch} (max accuracy so far {out.max_accuracy:.2f}%)")
        if path == auto and dist.is_main:
            sync_log(os.path.join(args.output_dir, "log.txt"), out.start_epoch - 1, ckpt.get("log_stats"))
    del ckpt
    return out


@contextlib.contextmanager
def _field(path: str, field: str):
    """A checkpoint field that passed the type checks but still does not load is one line naming it."""
    try:
        yield
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path}: its '{field}' entry does not load into this run ({detail}): "
                              f"the file is damaged or was written by another setup; resume from another "
                              f"checkpoint, or start from its weights with --finetune") from None


def with_current_kernels(saved: dict, optimizer) -> dict:
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


def sync_log(path: str, epoch: int, stats: Optional[dict]):
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
