"""Training system: the run's configuration (config: resolved once, frozen), the rooms that build a run's pieces
from it (output, loaders, model, resume, process), the engine (one training step, epochs), evaluation, optimizer
and schedule, EMA, checkpoints, and the runner: resolve the configuration, build, loop."""
from .checkpoint import atomic_save, load_checkpoint
from .losses import DistillationLoss
from .engine import NonFiniteLossError, TrainStep, train_one_epoch, train_step
from .evaluation import evaluate, throughput
from .optim import CosineSchedule, build_optimizer, param_groups

__all__ = ["atomic_save", "load_checkpoint", "DistillationLoss", "NonFiniteLossError", "evaluate", "throughput",
           "train_one_epoch", "train_step", "TrainStep", "CosineSchedule", "build_optimizer", "param_groups"]
