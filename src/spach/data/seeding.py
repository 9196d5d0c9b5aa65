"""Per-sample augmentation randomness: each training sample's random draws are a function of (seed, epoch, its
position in the epoch) only.

Without this, a loader worker's random stream runs on from batch to batch, so what sample ``k`` of an epoch
looks like depends on which worker read it and on everything that worker read before. Seeding every sample
from its position makes the augmentation independent of the number of loader workers, of the number of
processes and of where a run was stopped: a run resumed in the middle of an epoch (a recovery checkpoint) draws
exactly what an uninterrupted run draws, and a run resumed on another number of processes augments each image
of the epoch as before.

The samplers of :mod:`spach.data.samplers` give ``(position, index)`` pairs; :class:`SeededSamples` wraps a
map-style dataset so that each item is read with torch's CPU generator, Python's ``random`` and NumPy's global
generator seeded from :func:`sample_seed`, and the caller's states put back afterwards (with ``num_workers=0``
the caller is the training process, whose own random stream must not move).
"""
import random
from typing import Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["sample_seed", "SeededSamples", "SeededKeys"]

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: nearby inputs give unrelated 64-bit outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of ``epoch``'s order in a run seeded by ``seed``."""
    return _mix(_mix(_mix(seed & _MASK) ^ (epoch & _MASK)) ^ (position & _MASK)) >> 1


class _Reseeded:
    """Save the process's CPU random states once, reseed them per item, restore them at the end."""

    def __enter__(self):
        self.torch = torch.default_generator.get_state()
        self.python = random.getstate()
        self.numpy = np.random.get_state()
        return self

    @staticmethod
    def seed(s: int):
        torch.default_generator.manual_seed(s)  # the CPU generator only: a device's stream is the training's
        random.seed(s)
        np.random.seed(s & 0xFFFFFFFF)

    def __exit__(self, *exc):
        torch.default_generator.set_state(self.torch)
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        return False


class SeededSamples(torch.utils.data.Dataset):
    """A map-style dataset whose keys are ``(index, seed)`` pairs (:class:`SeededKeys`): item ``index`` of the
    wrapped dataset, read with the CPU random generators seeded by ``seed``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # classes, samples, targets ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: Tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Tuple[int, int]]):
        items = []
        with _Reseeded() as rng:
            for index, s in keys:
                rng.seed(s)
                items.append(self.dataset[index])
        return items


class SeededKeys(Sampler):
    """A training sampler's indices as ``(index, seed)`` keys for :class:`SeededSamples`; ``set_epoch`` and the
    rest pass through to the sampler (``sampler.items()`` gives ``(position, index)`` pairs)."""

    def __init__(self, sampler, seed: int):
        self.sampler, self.seed = sampler, seed

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((index, sample_seed(self.seed, epoch, position)) for position, index in self.sampler.items())

    def __len__(self):
        return len(self.sampler)

    def __getattr__(self, name):
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)
