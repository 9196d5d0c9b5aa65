"""Training system: the engine (one training step, epochs, evaluation), optimizer and schedule, EMA, checkpoints,
the setup module that builds a run's pieces and the runner that loops over them."""
from .checkpoint import atomic_save, load_checkpoint
from .engine import (DistillationLoss, NonFiniteLossError, TrainStep, evaluate, throughput, train_one_epoch,
                     train_step)
from .optim import CosineSchedule, build_optimizer, param_groups

__all__ = ["atomic_save", "load_checkpoint", "DistillationLoss", "NonFiniteLossError", "evaluate", "throughput",
           "train_one_epoch", "train_step", "TrainStep", "CosineSchedule", "build_optimizer", "param_groups"]
