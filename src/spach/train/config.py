"""The run's configuration: one typed, frozen value, grouped by concern.

:func:`spach.train.resolve.resolve_config` builds it once from the flags and ``--config`` files and records
where each value came from (:attr:`RunConfig.sources`). Nothing changes it afterwards: the sections are frozen
dataclasses, and the builders take the section they need.

The flag names are the DeiT / SPACH ``main.py`` ones, and :meth:`RunConfig.checkpoint_args` writes a
checkpoint's ``args`` as the original does (flat, ``lr`` the scaled lr), with ``base_lr`` beside it.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from ..models import arch_options
from .args import SECTIONS

__all__ = ["RunConfig", "DataConfig", "ModelConfig", "OptimConfig", "AugConfig", "DistillConfig", "OutputConfig",
           "DeviceConfig", "SECTION_TYPES", "RESUME_IDENTITY", "LR_BATCH"]

LR_BATCH = 512  # --lr is the rate for this global batch, scaled linearly (DeiT)
_DERIVED = {"derived": True}  # metadata of fields computed by the resolution, never read from a file


@dataclass(frozen=True)
class DataConfig:
    data_path: str
    data_set: str
    inat_category: str
    input_size: int
    num_workers: int
    pin_mem: bool
    strict_data: bool
    repeated_aug: bool
    data_pipeline: str


@dataclass(frozen=True)
class ModelConfig:
    model: str
    drop: float
    drop_path: float
    model_ema: bool
    stem_type: Optional[str]
    shared_spatial_func: bool
    norm_layer: Optional[str]
    act_layer: Optional[str]
    model_ema_decay: float
    model_ema_force_cpu: bool


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int
    grad_accum_steps: int          # resolved: 1, or --global-batch / (batch x processes)
    global_batch_size: Optional[int]  # --global-batch as given (None: batch x accumulation x processes)
    epochs: int
    opt: str
    opt_eps: float
    opt_betas: Optional[Tuple[float, ...]]
    clip_grad: Optional[float]
    momentum: float
    weight_decay: float
    sched: str
    lr_noise: Optional[Tuple[float, ...]]
    lr_noise_pct: float
    lr_noise_std: float
    decay_epochs: float
    patience_epochs: int
    decay_rate: float
    lr: float                      # the base lr, for a global batch of LR_BATCH
    warmup_lr: float
    min_lr: float
    warmup_epochs: float
    cooldown_epochs: float
    sched_per_step: bool
    global_batch: int = field(default=0, metadata=_DERIVED)       # batch x accumulation x processes
    effective_lr: float = field(default=0.0, metadata=_DERIVED)   # lr x global batch / LR_BATCH


@dataclass(frozen=True)
class AugConfig:
    color_jitter: float
    aa: str
    smoothing: float
    train_interpolation: str
    hflip: float
    crop_pct: Optional[float]
    reprob: float
    remode: str
    recount: int
    resplit: bool
    mixup: float
    cutmix: float
    cutmix_minmax: Optional[Tuple[float, ...]]
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    scale: Tuple[float, float]     # RandomResizedCrop's area range (recipe table / config file; no flag)

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


@dataclass(frozen=True)
class DistillConfig:
    teacher_model: str
    teacher_path: str
    distillation_type: str
    distillation_alpha: float
    distillation_tau: float
    finetune: str


@dataclass(frozen=True)
class OutputConfig:
    output_dir: str                # "" saves nothing
    resume: str
    auto_resume: bool
    start_epoch: int
    recovery_interval: int         # optimizer steps between mid-epoch recovery checkpoints (0: none)
    checkpoint_hist: int           # the K best epoch checkpoints kept as checkpoint-<epoch>.pth (0: none)
    allow_batch_change: bool       # a resume may change the global batch
    eval: bool
    eval_ema: bool
    dist_eval: bool
    throughput: bool
    seed: int
    deterministic: bool
    results_file: str              # spach eval: the CSV / JSON file its row is appended to
    print_freq: int
    log_interval: int              # resolved: --print-freq when not given
    log_grad_norm: bool
    tensorboard: bool
    log_wandb: bool
    wandb_project: str
    wandb_name: str
    wandb_tags: str
    mlflow_uri: str
    mlflow_experiment: str
    mlflow_run_name: str
    mlflow_log_best: bool


@dataclass(frozen=True)
class DeviceConfig:
    device: Optional[str]
    npu: bool
    amp: str                       # resolved: bf16 | fp16 | off
    channels_last: bool
    grad_checkpointing: bool
    compile: bool
    sync_bn: bool
    world_size: int                # the number of processes (torchrun's WORLD_SIZE)
    dist_url: str
    local_rank: int
    kind: str = field(default="cpu", metadata=_DERIVED)          # cuda | npu | mps | cpu
    index: Optional[int] = field(default=None, metadata=_DERIVED)  # --device cuda:1


SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "aug": AugConfig,
                  "distill": DistillConfig, "output": OutputConfig, "device": DeviceConfig}
assert list(SECTION_TYPES) == list(SECTIONS)

# what a checkpoint's weights and optimizer state depend on (beyond the class names): a resume must match
# these fields exactly; everything else (epochs, lr, batch, augmentation, processes ...) may change on a resume.
# The architecture options are those the model families declare (spach.models.arch_options).
RESUME_IDENTITY = ("model.model", "data.input_size", *(f"model.{k}" for k in arch_options()), "optim.opt")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    aug: AugConfig
    distill: DistillConfig
    output: OutputConfig
    device: DeviceConfig
    sources: Mapping[str, str] = field(default_factory=dict)   # field name -> where its value came from
    command: Tuple[str, ...] = ()                               # the command line, for config.yaml's header
    config_files: Tuple[str, ...] = ()

    @property
    def eval_only(self) -> bool:
        return bool(self.output.eval or self.output.throughput)

    def sections(self):
        """``(key, section)`` pairs in SECTIONS order."""
        return [(key, getattr(self, key)) for key in SECTIONS]

    def get(self, dotted: str):
        section, name = dotted.split(".")
        return getattr(getattr(self, section), name)

    def checkpoint_args(self) -> dict:
        """A checkpoint's ``args`` as the original ``main.py`` saves them: one flat dict of the flags, ``lr`` the
        scaled lr; ``base_lr`` keeps the lr as given."""
        out = {}
        for _, section in self.sections():
            for f in dataclasses.fields(section):
                if f.metadata.get("derived"):
                    continue
                value = getattr(section, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        out["base_lr"], out["lr"] = self.optim.lr, self.optim.effective_lr
        out["config"] = list(self.config_files)
        return out
