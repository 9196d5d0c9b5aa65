"""Samplers: repeated augmentation for training, exact sharding for distributed evaluation.

Both are functions of ``(seed, epoch, rank, world_size)`` only, so a resumed run draws the same order.
"""
import math

import torch
from torch.utils.data import Sampler

__all__ = ["RASampler", "ShuffleSampler", "EvalShardSampler"]


def _epoch_order(n: int, shuffle: bool, seed: int, epoch: int):
    """The sample order of one epoch: a permutation seeded by ``seed + epoch`` (the same on every rank)."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


class _EpochSampler(Sampler):
    """What the training samplers share: the dataset size, this process's shard, the seed and the epoch."""

    def __init__(self, dataset_len: int, num_replicas: int, rank: int, shuffle: bool, seed: int):
        if dataset_len < num_replicas:
            raise ValueError(f"{dataset_len} samples cannot be split over {num_replicas} processes")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def _order(self):
        return _epoch_order(self.dataset_len, self.shuffle, self.seed, self.epoch)

    def set_epoch(self, epoch: int):
        self.epoch = epoch


class RASampler(_EpochSampler):
    """Repeated augmentation (Hoffer et al. 2020; DeiT): each image appears ``repeats`` times per epoch, the
    copies spread over ranks so each rank sees different augmentations of it. An epoch has
    ``len(dataset) // world_size`` samples per rank, as many as without repetition."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 repeats: int = 3, seed: int = 0):
        super().__init__(dataset_len, num_replicas, rank, shuffle, seed)
        self.repeats = repeats
        self.num_samples = int(math.ceil(dataset_len * repeats / num_replicas))
        self.total_size = self.num_samples * num_replicas
        self.num_selected_samples = dataset_len // num_replicas

    def __iter__(self):
        indices = [i for i in self._order() for _ in range(self.repeats)]
        indices += indices[:self.total_size - len(indices)]
        indices = indices[self.rank:self.total_size:self.num_replicas]
        return iter(indices[:self.num_selected_samples])

    def __len__(self):
        return self.num_selected_samples


class ShuffleSampler(_EpochSampler):
    """A seeded per-epoch permutation, sharded over ranks (``DistributedSampler`` with ``drop_last``
    semantics, so every rank gets the same number of samples)."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset_len, num_replicas, rank, shuffle, seed)
        self.num_samples = dataset_len // num_replicas

    def __iter__(self):
        return iter(self._order()[self.rank:self.num_samples * self.num_replicas:self.num_replicas])

    def __len__(self):
        return self.num_samples


class EvalShardSampler(Sampler):
    """Rank ``r`` of ``W`` evaluates samples ``r, r+W, r+2W ...``: every sample exactly once over all ranks,
    nothing padded or duplicated, so summed counts give exactly the single-process metric."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, dataset_len, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
