"""Samplers: repeated augmentation for training, exact sharding for distributed evaluation.

An epoch of training is one global sequence of samples, a function of ``(seed, epoch)`` only: rank ``r`` of
``W`` reads its positions ``r, r+W, r+2W ...``. So the samples of optimizer step ``s`` at a global batch ``G`` are
positions ``[s*G, (s+1)*G)`` whatever the number of processes and the accumulation that make up ``G``, and a run
that resumes at position ``start`` (``set_epoch(epoch, start)``, a multiple of ``G``) on any number of processes
reads the rest of the same sequence: no sample repeated, none skipped. ``global_batch`` trims the epoch to whole
global batches (the samples after the last one come first in another epoch's order).
"""
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

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 global_batch: int = 0):
        if dataset_len < num_replicas:
            raise ValueError(f"{dataset_len} samples cannot be split over {num_replicas} processes")
        if global_batch and global_batch % num_replicas:
            raise ValueError(f"a global batch of {global_batch} cannot be split over {num_replicas} processes")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.unit = global_batch or num_replicas  # an epoch uses whole global batches (or equal shares per rank)
        self.epoch_len = dataset_len // self.unit * self.unit

    def _order(self):
        return _epoch_order(self.dataset_len, self.shuffle, self.seed, self.epoch)

    def _sequence(self):
        """The epoch's global sequence of dataset indices (at least ``epoch_len`` long)."""
        return self._order()

    def set_epoch(self, epoch: int, start: int = 0):
        """Read ``epoch``'s sequence from global position ``start`` (the samples all ranks consumed before a
        mid-epoch resume; a multiple of the number of processes). The epoch then ends after the last whole global
        batch from ``start`` on (where it always ends when ``start`` is a multiple of the global batch)."""
        if start % self.num_replicas or not 0 <= start <= self.dataset_len:
            raise ValueError(f"position {start} does not start a step of {self.num_replicas} processes in an epoch "
                             f"of {self.dataset_len} samples")
        self.epoch, self.start = epoch, start
        self.epoch_len = start + (self.dataset_len - start) // self.unit * self.unit

    def items(self):
        """This rank's ``(global position, dataset index)`` pairs of the epoch, from ``start`` on."""
        sequence = self._sequence()
        return ((p, sequence[p]) for p in range(self.start + self.rank, self.epoch_len, self.num_replicas))

    def __iter__(self):
        return (index for _, index in self.items())

    def __len__(self):
        return (self.epoch_len - self.start) // self.num_replicas


class RASampler(_EpochSampler):
    """Repeated augmentation (Hoffer et al. 2020; DeiT): each image appears ``repeats`` times per epoch, the
    copies spread over ranks so each rank sees different augmentations of it. An epoch has
    ``len(dataset) // world_size`` samples per rank, as many as without repetition."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 repeats: int = 3, seed: int = 0, global_batch: int = 0):
        super().__init__(dataset_len, num_replicas, rank, shuffle, seed, global_batch)
        self.repeats = repeats

    def _sequence(self):
        # each image `repeats` times in a row: consecutive positions go to different ranks
        return [i for i in self._order() for _ in range(self.repeats)]


class ShuffleSampler(_EpochSampler):
    """A seeded per-epoch permutation, sharded over ranks (``DistributedSampler`` with ``drop_last``
    semantics, so every rank gets the same number of samples)."""


class EvalShardSampler(Sampler):
    """Rank ``r`` of ``W`` evaluates samples ``r, r+W, r+2W ...``: every sample exactly once over all ranks,
    nothing padded or duplicated, so summed counts give exactly the single-process metric."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, dataset_len, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
