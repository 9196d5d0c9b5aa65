"""Training system: engine, optimizer and schedule, checkpoints, device and distributed setup."""
from .checkpoint import atomic_save, load_checkpoint
from .engine import DistillationLoss, NonFiniteLossError, evaluate, throughput, train_one_epoch
from .optim import CosineSchedule, build_optimizer, param_groups

__all__ = ["atomic_save", "load_checkpoint", "DistillationLoss", "NonFiniteLossError", "evaluate", "throughput",
           "train_one_epoch", "CosineSchedule", "build_optimizer", "param_groups"]
