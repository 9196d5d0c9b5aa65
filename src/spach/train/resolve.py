"""The one place where a ``spach train`` / ``spach eval`` run is decided: :func:`resolve_config`.

In order: the command line (which wins), the ``--config`` files (later files win over earlier ones), the DeiT
recipe defaults with ``--data-path`` or the demo defaults without it, each model's own stochastic-depth rate,
what the checkpoint being evaluated or fine-tuned fixes (model, input size, crop, ShiftViT's variant), the device
and precision choice, the lr scaling by the global batch, and every check that involves more than one flag.
"""
import dataclasses
import os
import types

from ..errors import SpachError
from ..files import inside
from ..runtime import device as devices
from .args import DEIT_DEFAULTS, DEMO_DEFAULTS
from .config import LR_BATCH, SECTION_TYPES, RunConfig
from .config_file import explicit_dests, parser_defaults, read_config_files

__all__ = ["resolve_config", "resolve_run"]


def _stored_eval_facts(weights) -> dict:
    """model / input_size / crop_pct that the weights being evaluated record (a training checkpoint's flags, an
    export's metadata, a model folder's config), checked when the file was opened: untrusted input."""
    if weights is None:
        return {}
    facts = weights.facts
    out = {k: facts[k] for k in ("model", "crop_pct") if facts.get(k) is not None}
    size = facts.get("img_size")
    if size is not None and size[0] == size[-1]:  # --input-size is one side: a square input
        out["input_size"] = int(size[0])
    return out


def _start_weights(v: "_Values"):
    """The weights file the run starts from, opened once: --finetune when training, the checkpoint when
    evaluating; None otherwise."""
    from ..weights import open_weights
    evaluating = v["eval"] or v["throughput"]
    source = v["resume"] if evaluating else v["finetune"]
    return open_weights(source) if source else None


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


def _recipe_defaults(v: _Values, start):
    """DeiT recipe (with --data-path) or demo values for what is still unset; an evaluated checkpoint's model,
    input size and crop; the model's own drop-path rate."""
    table, name = (DEIT_DEFAULTS, "DeiT recipe") if v["data_path"] else (DEMO_DEFAULTS, "demo default")
    stored = _stored_eval_facts(start) if (v["eval"] or v["throughput"]) else {}
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
    betas, minmax = v["opt_betas"], v["cutmix_minmax"]
    if betas is not None and not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise SpachError(f"--opt-betas takes two numbers in [0, 1) (e.g. 0.9 0.999), got {list(betas)}")
    if minmax is not None and not (len(minmax) == 2 and 0 < minmax[0] < minmax[1] <= 1):
        raise SpachError(f"--cutmix-minmax takes two fractions MIN MAX with 0 < MIN < MAX <= 1, got {list(minmax)}")
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
    training = not (v["eval"] or v["throughput"])
    if training and (v["mixup"] > 0 or v["cutmix"] > 0 or v["cutmix_minmax"] is not None) and v["batch_size"] % 2:
        raise SpachError(f"mixup/cutmix need an even --batch-size (got {v['batch_size']}): use {v['batch_size'] + 1}"
                         f" or --mixup 0 --cutmix 0")
    if training and v["start_epoch"] >= v["epochs"]:
        raise SpachError(f"--start_epoch {v['start_epoch']} is not below --epochs {v['epochs']}: nothing would be "
                         f"trained; lower --start_epoch or raise --epochs")
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


def _check_processes(v: _Values):
    """The checks that need the number of processes (resolved by :func:`_device`)."""
    training = not (v["eval"] or v["throughput"])
    if training and v["sync_bn"] and v["world_size"] < 2:
        # whether the model has BatchNorm is known once it is built (spach.train.model.sync_batchnorm)
        from .sync_bn import ONE_PROCESS
        raise SpachError(ONE_PROCESS)


def _model_variant(v: _Values, start):
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
    if start is not None:
        arch_from_checkpoint(v["model"], start, bool(v["eval"] and v["eval_ema"]), found,
                             spell=lambda key, value: f"--{key.replace('_', '-')}" + (f" {value}" if value else ""))
    for key, (default, _) in options.items():
        if key in given:
            continue
        v.set(key, found.get(key, default), f"weights {start.source}" if key in found else f"{v['model']}'s default")


def _scaled_lr(v: _Values):
    """The accumulation (--grad-accum-steps, or what --global-batch implies), the global batch and the lr scaled
    to it."""
    world, batch, accum, wanted = v["world_size"], v["batch_size"], v["grad_accum_steps"], v["global_batch_size"]
    per_step = batch * world
    if wanted is not None:
        if wanted % per_step:
            raise SpachError(f"--global-batch {wanted} is not a multiple of --batch-size {batch} x {world} process(es) "
                             f"= {per_step}: pick a --batch-size that divides {wanted // world if wanted % world == 0 else wanted}"
                             f" per process, or a --global-batch that is a multiple of {per_step}")
        implied = wanted // per_step
        if accum is not None and accum != implied:
            raise SpachError(f"--global-batch {wanted} means --grad-accum-steps {implied} at --batch-size {batch} x "
                             f"{world} process(es), not {accum}: give one of the two")
        v.set("grad_accum_steps", implied, f"--global-batch {wanted} / (--batch-size {batch} x {world} process(es))")
    elif accum is None:
        v.set("grad_accum_steps", 1, "default")
    accum = v["grad_accum_steps"]
    v.set("global_batch", per_step * accum,
          f"--batch-size x {accum} accumulation x {world} process(es)" if accum > 1 else
          f"--batch-size x {world} process(es)")
    v.set("effective_lr", v["lr"] * per_step * accum / LR_BATCH, f"--lr x global batch / {LR_BATCH}")


def _trackers(v: _Values, mode: str):
    results = v["results_file"]
    if results and not (v["eval"] and not v["throughput"]):
        raise SpachError("--results-file holds evaluation results: use it with spach eval (or spach train --eval)")
    if results and os.path.splitext(results)[1].lower() not in (".csv", ".json"):
        raise SpachError(f"--results-file {results}: name a .csv or a .json file")
    v.fill("log_interval", v["print_freq"], "--print-freq")
    if mode == "train" and not (v["eval"] or v["throughput"]):
        # a missing extra is one line naming it, before anything is built (not after the first epoch)
        from .metrics import require_sinks
        require_sinks(types.SimpleNamespace(**{k: v[k] for k in ("tensorboard", "log_wandb", "mlflow_uri")}))


def _output_dir(v: _Values):
    if v["output_dir"] is None:
        data = os.path.basename(os.path.normpath(v["data_path"])) if v["data_path"] else "mnist5k"
        v.set("output_dir", os.path.join("output", f"{v['model']}-{data}"), "default: output/<model>-<data>")
    out, data = v["output_dir"], v["data_path"]
    if out and data and not (v["eval"] or v["throughput"]) and inside(out, data):
        # its checkpoints and logs would be read as a class folder (or an image) by the next run on that data
        raise SpachError(f"--output_dir {out} is inside --data-path {data}: the next run on that data would read the "
                         f"run's files as data; pass an --output_dir outside {data}")


def resolve_config(ns, mode: str = "train") -> RunConfig:
    """The run's :class:`RunConfig` from parsed flags (``ns``, with the command line in ``ns._argv`` when parsed by
    the ``spach`` command) and the ``--config`` files they name. ``mode``: ``"train"`` or ``"eval"``. Raises
    :class:`SpachError` (one line) for anything that cannot run; nothing has been created or written then."""
    return resolve_run(ns, mode)[0]


def resolve_run(ns, mode: str = "train"):
    """:func:`resolve_config`, and the weights file the run starts from (:func:`_start_weights`), opened once
    while resolving, for the builders to take: ``(RunConfig, WeightsFile or None)``."""
    v = _gather(ns, mode)
    _local_files(v)
    if v["eval"] and not v["resume"]:
        raise SpachError("evaluation needs weights: pass --checkpoint/--resume CKPT (a checkpoint.pth, best.pth, an "
                         "official release .pth, a .safetensors file or a model folder)")
    start = _start_weights(v)
    _recipe_defaults(v, start)
    _check(v, mode)
    _device(v)
    _check_processes(v)
    _model_variant(v, start)
    _scaled_lr(v)
    _trackers(v, mode)
    _output_dir(v)
    sections = {}
    for key, cls in SECTION_TYPES.items():
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = v.values.get(f.name)
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        sections[key] = cls(**kwargs)
    argv = getattr(ns, "_argv", None)
    cfg = RunConfig(**sections, sources=types.MappingProxyType(dict(v.sources)),
                    command=tuple(["spach", *argv] if argv is not None else ()),
                    config_files=tuple(os.path.abspath(p) for p in (v.values.get("config") or [])))
    return cfg, start
