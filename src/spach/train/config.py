"""The run's configuration: one typed, frozen value, resolved once from the flags and ``--config`` files.

:func:`resolve_config` is the one place where a ``spach train`` / ``spach eval`` run is decided: the command
line (which wins), the ``--config`` files (later files win over earlier ones), the DeiT recipe defaults with
``--data-path`` or the demo defaults without it, each model's own stochastic-depth rate, what the checkpoint
being evaluated or fine-tuned fixes (model, input size, crop, ShiftViT's variant), the device and precision
choice, the lr scaling by the global batch, and every check that involves more than one flag. It records where
each value came from (:attr:`RunConfig.sources`). Nothing changes the result afterwards: the sections are frozen
dataclasses, and builders take the section they need.

The flag names are the DeiT / SPACH ``main.py`` ones, and :meth:`RunConfig.checkpoint_args` writes a
checkpoint's ``args`` as the original does (flat, ``lr`` the scaled lr), with ``base_lr`` beside it.
"""
import dataclasses
import os
import types
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from ..errors import SpachError
from ..runtime import device as devices
from .args import DEIT_DEFAULTS, DEMO_DEFAULTS, SECTIONS, check_flag_combinations
from .config_file import explicit_dests, parser_defaults, read_config_files

__all__ = ["RunConfig", "DataConfig", "ModelConfig", "OptimConfig", "AugConfig", "DistillConfig", "OutputConfig",
           "DeviceConfig", "resolve_config", "RESUME_IDENTITY", "LR_BATCH"]

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
    global_batch: int = field(default=0, metadata=_DERIVED)       # batch x processes
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
    eval: bool
    eval_ema: bool
    dist_eval: bool
    throughput: bool
    seed: int
    deterministic: bool
    print_freq: int
    tensorboard: bool


@dataclass(frozen=True)
class DeviceConfig:
    device: Optional[str]
    npu: bool
    amp: str                       # resolved: bf16 | fp16 | off
    channels_last: bool
    grad_checkpointing: bool
    compile: bool
    world_size: int                # the number of processes (torchrun's WORLD_SIZE)
    dist_url: str
    local_rank: int
    kind: str = field(default="cpu", metadata=_DERIVED)          # cuda | npu | mps | cpu
    index: Optional[int] = field(default=None, metadata=_DERIVED)  # --device cuda:1


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "aug": AugConfig,
                  "distill": DistillConfig, "output": OutputConfig, "device": DeviceConfig}
assert list(_SECTION_TYPES) == list(SECTIONS)

# what a checkpoint's weights and optimizer state depend on (beyond the class names): a resume must match
# these fields exactly; everything else (epochs, lr, batch, augmentation, processes ...) may change on a resume
RESUME_IDENTITY = ("model.model", "data.input_size", "model.stem_type", "model.shared_spatial_func",
                   "model.norm_layer", "model.act_layer", "optim.opt")


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


def _stored_eval_facts(path: str) -> dict:
    """model / input_size / crop_pct that a training checkpoint being evaluated records (checked: untrusted)."""
    from ..weights import read_checkpoint_file, stored_facts
    if not path or not path.endswith(".pth"):
        return {}
    ck = read_checkpoint_file(path)
    stored = ck.get("args") if isinstance(ck, dict) and isinstance(ck.get("args"), dict) else None
    if stored is None:
        return {}
    stored_facts(stored, path)
    return {k: stored[k] for k in ("model", "input_size", "crop_pct") if stored.get(k) is not None}


class _Values:
    """The flat values being resolved and where each came from."""

    def __init__(self, values: dict, sources: dict):
        self.values, self.sources = values, sources

    def __getitem__(self, key):
        return self.values[key]

    def set(self, key, value, source: str):
        self.values[key] = value
        self.sources[key] = source

    def fill(self, key, value, source: str):
        """``value`` where nothing has set ``key`` (it is None)."""
        if self.values.get(key) is None:
            self.set(key, value, source)


def _gather(ns, mode: str) -> _Values:
    """Parser defaults < config files < the command line."""
    defaults = parser_defaults()
    given = {k: v for k, v in vars(ns).items() if not k.startswith("_")}
    argv = getattr(ns, "_argv", None)
    parser = getattr(ns, "_parser", None)
    if argv is not None and parser is not None:
        explicit = explicit_dests(parser, argv)
    else:  # parsed without the cli: a value other than the default was given
        explicit = {k for k, v in given.items() if k in defaults and v != defaults[k]}
    values = dict(defaults)
    sources = {k: "default" for k in values}
    for key, (value, where) in read_config_files(given.get("config") or []).items():
        values[key], sources[key] = value, where
    for key, value in given.items():
        if key in explicit or key not in values or sources.get(key) == "default":
            values[key] = value
            if key in explicit:
                sources[key] = "command line"
    if mode == "eval":
        values["eval"] = True
    return _Values(values, sources)


def _recipe_defaults(v: _Values):
    """DeiT recipe (with --data-path) or demo values for what is still unset; an evaluated checkpoint's model,
    input size and crop; the model's own drop-path rate."""
    table, name = (DEIT_DEFAULTS, "DeiT recipe") if v["data_path"] else (DEMO_DEFAULTS, "demo default")
    stored = _stored_eval_facts(v["resume"]) if (v["eval"] or v["throughput"]) else {}
    for key in ("model", "input_size", "crop_pct"):
        if key in stored:
            v.fill(key, stored[key], f"checkpoint {v['resume']}")
    if v["drop_path"] is None and (v["model"] or table["model"]):
        from ..models import default_drop_path_rate
        model = v["model"] or table["model"]
        try:
            own = default_drop_path_rate(model)
        except KeyError:  # an unknown name is reported when the model is built
            own = None
        if own is not None:  # the rate the model's original registry trained it with
            v.set("drop_path", own, f"{model}'s own default")
    for key, value in table.items():
        v.fill(key, value, name)


def _local_files(v: _Values):
    """URLs of --resume / --finetune / --teacher-path, as the original accepts them: downloaded once, cached."""
    from ..weights import is_url, local_weights
    for key in ("resume", "finetune", "teacher_path"):
        if v[key] and is_url(v[key]):
            v.set(key, local_weights(v[key]), f"downloaded from {v[key]}")


def _check(v: _Values, mode: str):
    """Every check that involves more than one flag (or a flag and the mode)."""
    try:
        check_flag_combinations(types.SimpleNamespace(**v.values))
    except ValueError as e:
        raise SpachError(str(e)) from None
    if v["data_set"] not in ("IMNET", "WDS", "HFDS"):
        raise SpachError(
            f"--data-set {v['data_set']}: spach reads ImageNet-layout folders (DIR/train/<class>/*, DIR/val/<class>/*) "
            f"and WDS / HFDS shards only: write the {v['data_set']} images into that layout, point --data-path at it "
            f"and drop the flag (or pass --data-set IMNET)")
    if v["data_set"] in ("WDS", "HFDS"):
        if not v["data_path"]:
            raise SpachError(f"--data-set {v['data_set']} needs --data-path DIR: the folder of the shards (or drop "
                             f"--data-set to train on the demo data)")
        if v["data_pipeline"] == "fast" and mode == "train" and not v["eval"]:
            raise SpachError(f"--data-pipeline fast reads ImageFolders only: use --data-pipeline timm with "
                             f"--data-set {v['data_set']}")
    if v["lr_noise"] is not None:
        raise SpachError("--lr-noise is not supported (the SPACH / DeiT recipe does not use it): drop the flag")
    if v["eval"] and not v["resume"]:
        raise SpachError("evaluation needs weights: pass --checkpoint/--resume CKPT (a checkpoint.pth, best.pth or an "
                         "official release .pth)")
    training = not (v["eval"] or v["throughput"])
    if training and (v["mixup"] > 0 or v["cutmix"] > 0 or v["cutmix_minmax"] is not None) and v["batch_size"] % 2:
        raise SpachError(f"mixup/cutmix need an even --batch-size (got {v['batch_size']}): use {v['batch_size'] + 1}"
                         f" or --mixup 0 --cutmix 0")
    if training and v["distillation_type"] != "none" and not v["teacher_path"]:
        raise SpachError("--distillation-type soft/hard needs --teacher-path (weights of --teacher-model)")


def _device(v: _Values):
    """--npu, the device kind and index, the world size and the autocast choice for this machine."""
    if v["npu"]:
        if v["device"] and v["device"].split(":")[0] != "npu":
            raise SpachError(f"--npu conflicts with --device {v['device']}: pass one of them")
        v.set("device", v["device"] or "npu", "--npu")  # keeps an index: --npu --device npu:1
    kind = devices.resolve_device(v["device"])
    v.set("kind", kind, "command line" if v["device"] else "the best available")
    v.set("index", devices.requested_index(v["device"]), v.sources.get("device", "default"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    v.set("world_size", world, "torchrun (WORLD_SIZE)" if "WORLD_SIZE" in os.environ else "one process")
    import torch
    dtype = devices.resolve_amp(v["amp"], kind)
    amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if v["amp"] is None:
        v.set("amp", amp, f"this machine's default on {kind}")
    else:
        v.set("amp", amp, v.sources.get("amp", "command line"))


def _model_variant(v: _Values):
    """ShiftViT's --norm-layer / --act-layer: the flag, else what the weights the run starts from hold, else
    the family default; a variant flag on a model without variants is refused."""
    from ..models import arch_from_checkpoint, variant_options
    options = variant_options(v["model"])
    given = {k: v[k] for k in ("norm_layer", "act_layer") if v[k]}
    foreign = [f"--{k.replace('_', '-')}" for k in given if k not in options]
    if foreign:
        raise SpachError(f"{' / '.join(foreign)} chooses a ShiftViT variant (shiftvit_* models); {v['model']} has no "
                         f"such option: leave {' and '.join(foreign)} out")
    if not options:
        return
    found = dict(given)
    evaluating = v["eval"] or v["throughput"]
    start = v["finetune"] if v["finetune"] and not evaluating else (v["resume"] if evaluating and v["resume"] else None)
    if start:
        arch_from_checkpoint(v["model"], start, bool(v["eval"] and v["eval_ema"]), found,
                             spell=lambda key, value: f"--{key.replace('_', '-')}" + (f" {value}" if value else ""))
    for key, (default, _) in options.items():
        if key in given:
            continue
        v.set(key, found.get(key, default), f"weights {start}" if key in found else f"{v['model']}'s default")


def _scaled_lr(v: _Values):
    world = v["world_size"]
    v.set("global_batch", v["batch_size"] * world, f"--batch-size x {world} process(es)")
    v.set("effective_lr", v["lr"] * v["batch_size"] * world / LR_BATCH, f"--lr x global batch / {LR_BATCH}")


def _output_dir(v: _Values):
    if v["output_dir"] is None:
        data = os.path.basename(os.path.normpath(v["data_path"])) if v["data_path"] else "mnist5k"
        v.set("output_dir", os.path.join("output", f"{v['model']}-{data}"), "default: output/<model>-<data>")


def resolve_config(ns, mode: str = "train") -> RunConfig:
    """The run's :class:`RunConfig` from parsed flags (``ns``, with the command line in ``ns._argv`` when parsed by
    the ``spach`` command) and the ``--config`` files they name. ``mode``: ``"train"`` or ``"eval"``. Raises
    :class:`SpachError` (one line) for anything that cannot run; nothing has been created or written then."""
    v = _gather(ns, mode)
    _local_files(v)
    _recipe_defaults(v)
    _check(v, mode)
    _device(v)
    _model_variant(v)
    _scaled_lr(v)
    _output_dir(v)
    sections = {}
    for key, cls in _SECTION_TYPES.items():
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = v.values.get(f.name)
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        sections[key] = cls(**kwargs)
    argv = getattr(ns, "_argv", None)
    return RunConfig(**sections, sources=types.MappingProxyType(dict(v.sources)),
                     command=tuple(["spach", *argv] if argv is not None else ()),
                     config_files=tuple(os.path.abspath(p) for p in (v.values.get("config") or [])))
