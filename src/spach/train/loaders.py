"""The run's data: the dataset check, the datasets and transforms, the samplers and loaders.

:func:`build_datasets` is the seam for another data source: it turns the checked sample lists into the train and
val datasets (and the on-device batch transform of the fast pipeline). Shards (``--data-set WDS`` / ``HFDS``) come
in beside it: :func:`open_shard_source` checks them, :func:`build_shard_datasets` builds their datasets.
"""
import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..data import (EvalShardSampler, RASampler, ShuffleSampler, TolerantImageFolder, build_transform, check_dataset,
                    prepare_demo_dataset)
from ..data.seeding import SeededKeys, SeededSamples
from ..errors import DataError, SpachError
from ..runtime import device as devices
from ..runtime.device import DistInfo
from .checkpoint import CHECKPOINT_NAME
from .config import AugConfig, DataConfig

__all__ = ["Data", "Reading", "build_data", "loader_death", "data_root", "build_transforms", "open_shard_source",
           "build_shard_datasets", "build_datasets", "build_loaders"]

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


@dataclass(frozen=True)
class Reading:
    """How batches are read: the batch size per process, the sampler seed, sharded evaluation, eval only, and the
    global batch (batch x accumulation x processes) an epoch is cut into."""
    batch_size: int
    seed: int
    dist_eval: bool
    eval_only: bool
    global_batch: int = 0


def data_root(data: DataConfig, dist: DistInfo) -> str:
    """``--data-path``, or the embedded demo dataset (prepared once, by rank 0 first)."""
    if data.data_path:
        return data.data_path
    root = prepare_demo_dataset() if dist.is_main else None
    if dist.distributed:
        devices.barrier()
        root = prepare_demo_dataset()
    logger.info(f"no --data-path: using the embedded MNIST-5k demo dataset at {root}")
    return root


def build_data(data: DataConfig, aug: AugConfig, reading: Reading, dist: DistInfo) -> Data:
    """Check the data before anything heavy happens, then the datasets, samplers and loaders."""
    root = data_root(data, dist)
    eval_only, batch_size = reading.eval_only, reading.batch_size
    splits = ("val",) if eval_only else ("train", "val")
    source = None
    if data.data_set in ("WDS", "HFDS"):
        source = open_shard_source(data, root, splits)
        class_names = source.classes
        n_train, n_val = (0 if eval_only else source.count("train")), source.count("val")
    else:
        class_names, samples = check_dataset(root, splits=splits)
        samples.setdefault("train", [])
        n_train, n_val = len(samples["train"]), len(samples["val"])
    if not eval_only and n_train // dist.world_size < batch_size:
        raise DataError(f"{os.path.join(root, 'train')} has {n_train} images, fewer than one batch of "
                        f"{batch_size} per process x {dist.world_size} process(es): lower --batch-size to at "
                        f"most {max(1, n_train // dist.world_size)}")
    if source is None:
        dataset_train, dataset_val, batch_transform = build_datasets(data, aug, class_names, samples, dist.device,
                                                                     eval_only)
    else:
        (dataset_train, dataset_val), batch_transform = build_shard_datasets(data, aug, reading, source, dist), None
    loader_train, sampler_train, loader_val, dist_eval = build_loaders(data, reading, dataset_train, dataset_val,
                                                                       n_train, n_val, dist)
    return Data(list(class_names), n_train, n_val, loader_train, loader_val, sampler_train, batch_transform,
                dist_eval)


def build_transforms(data: DataConfig, aug: AugConfig):
    """The DeiT train transform and the eval preset, as the configuration sets them: ``(train_tf, val_tf)``."""
    train_tf = build_transform(True, data.input_size, aa=aug.aa, color_jitter=aug.color_jitter,
                               train_interpolation=aug.train_interpolation, reprob=aug.reprob, remode=aug.remode,
                               recount=aug.recount, hflip=aug.hflip, scale=tuple(aug.scale))
    return train_tf, build_transform(False, data.input_size, crop_pct=aug.crop_pct)


def open_shard_source(data: DataConfig, root: str, splits):
    """The checked ``--data-set WDS`` / ``HFDS`` source at ``root`` (class names, sample counts per split)."""
    from ..data.shards import open_source
    return open_source(data.data_set, root, splits)


def build_shard_datasets(data: DataConfig, aug: AugConfig, reading: Reading, source, dist: DistInfo):
    """The train and val datasets of a shard ``source``: ``(dataset_train, dataset_val)``. WDS datasets split
    themselves over ranks (and loader workers); HFDS ones are map-style and go through the samplers of
    :func:`build_loaders` like an ImageFolder."""
    train_tf, val_tf = build_transforms(data, aug)
    dist_eval = reading.dist_eval and dist.distributed
    dataset_train = None
    if not reading.eval_only:
        dataset_train = source.dataset("train", train_tf, train=True, strict=data.strict_data,
                                       num_replicas=dist.world_size, rank=dist.rank, seed=reading.seed,
                                       batch_size=reading.batch_size, repeats=3 if data.repeated_aug else 1)
    dataset_val = source.dataset("val", val_tf, train=False, strict=data.strict_data,
                                 num_replicas=dist.world_size if dist_eval else 1, rank=dist.rank if dist_eval else 0)
    return dataset_train, dataset_val


def build_datasets(data: DataConfig, aug: AugConfig, class_names, samples, device: torch.device, eval_only: bool):
    """The train and val datasets from the checked ``samples`` (split -> [(path, class index)]), and the batch
    transform that finishes training batches on ``device`` (None with the timm pipeline). Returns
    ``(dataset_train, dataset_val, batch_transform)``; ``dataset_train`` is unused when ``eval_only``."""
    train_tf, val_tf = build_transforms(data, aug)
    dataset_train = TolerantImageFolder(samples["train"], class_names, train_tf, strict=data.strict_data)
    batch_transform = None
    if data.data_pipeline == "fast" and not eval_only:
        from ..data.fast_pipeline import build_fast_train_dataset
        try:
            dataset_train, batch_transform = build_fast_train_dataset(
                samples["train"], class_names, data.input_size, aa=aug.aa, hflip=aug.hflip, scale=aug.scale,
                reprob=aug.reprob, remode=aug.remode, recount=aug.recount, color_jitter=aug.color_jitter,
                strict=data.strict_data, interpolation=aug.train_interpolation)
        except ValueError as e:
            raise SpachError(f"--data-pipeline fast cannot run these flags ({e}): use --data-pipeline timm") from None
        batch_transform = batch_transform.to(device)
        from ..data import cv_augment
        logger.info("fast data pipeline: " + (
            "OpenCV decoding and RandAugment kernels" if cv_augment.available() else
            "PIL decoding and RandAugment: OpenCV (opencv-python-headless, a spach dependency) did not load; "
            "reinstall it (pip install --force-reinstall opencv-python-headless) for the faster kernels"))
    dataset_val = TolerantImageFolder(samples["val"], class_names, val_tf, strict=data.strict_data)
    return dataset_train, dataset_val, batch_transform


def build_loaders(data: DataConfig, reading: Reading, dataset_train, dataset_val, n_train: int, n_val: int,
                  dist: DistInfo):
    """Samplers (repeated-augmentation or shuffling shards for training, exact shards for evaluation) and
    loaders. Returns ``(loader_train, sampler_train, loader_val, dist_eval)``; the train pair is None when
    only evaluating. A streaming (WDS) dataset orders and splits itself: no sampler, and ``sampler_train`` is the
    dataset, whose ``set_epoch`` reshuffles its shards."""
    world, rank, eval_only = dist.world_size, dist.rank, reading.eval_only
    streaming = isinstance(dataset_val, torch.utils.data.IterableDataset)
    if eval_only:
        sampler_train = None
    elif streaming:
        sampler_train = dataset_train
    else:
        kind = RASampler if data.repeated_aug else ShuffleSampler
        sampler_train = kind(n_train, num_replicas=world, rank=rank, shuffle=True, seed=reading.seed,
                             global_batch=reading.global_batch)
    dist_eval = reading.dist_eval and dist.distributed
    if streaming:
        sampler_val = None
    else:
        sampler_val = EvalShardSampler(n_val, world, rank) if dist_eval else EvalShardSampler(n_val, 1, 0)
    if eval_only:
        loader_train = None
    elif streaming:
        loader_train = _loader(data, dataset_train, None, reading.batch_size, True, dist.device)
    else:  # each sample augmented from its own seed (spach.data.seeding): the same wherever a run stopped
        loader_train = _loader(data, SeededSamples(dataset_train), SeededKeys(sampler_train, reading.seed),
                               reading.batch_size, True, dist.device)
    loader_val = _loader(data, dataset_val, sampler_val, int(1.5 * reading.batch_size), False, dist.device)
    return loader_train, sampler_train, loader_val, dist_eval


def _loader(data: DataConfig, dataset, sampler, batch_size, drop_last, device):
    # The loader's own generator draws its workers' base seed, so that starting an iterator (every epoch, and
    # again at a mid-epoch resume) leaves the training process's random stream where it was. Fresh workers per
    # epoch; they leave stop signals to the training process (spach.train.preemption).
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, num_workers=data.num_workers,
        pin_memory=data.pin_mem and device.type in ("cuda", "npu"), drop_last=drop_last,
        persistent_workers=False, generator=torch.Generator().manual_seed(0),
        worker_init_fn=_ignore_stop_signals if data.num_workers else None)


def _ignore_stop_signals(worker_id: int):
    """A loader worker ignores SIGTERM / SIGUSR1 / SIGINT (a terminal's Ctrl-C and SLURM reach every process of
    the job): the training process finishes its step and shuts the workers down itself."""
    import signal
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def loader_death(cfg, e: RuntimeError) -> str:
    """One line for a data loader worker killed under the run (the out-of-memory killer, a kill by hand)."""
    detail = str(e).strip().splitlines()[0][:160]
    ckpt = os.path.join(cfg.output.output_dir, CHECKPOINT_NAME) if cfg.output.output_dir else ""
    if cfg.eval_only:
        then = "rerun the same command"
    elif ckpt and os.path.isfile(ckpt):
        then = f"rerunning the same command resumes from {ckpt}"
    else:
        then = "rerunning the same command starts the run again (no checkpoint had been written yet)"
    return (f"a data loader worker died ({detail}); the usual cause is the out-of-memory killer: lower --num_workers "
            f"or --batch-size if it was, then {then}")
