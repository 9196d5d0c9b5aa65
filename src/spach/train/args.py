"""The one flag parser of ``spach train`` / ``spach eval``: the DeiT / SPACH ``main.py`` flags and defaults.

Both spellings are accepted (``--batch-size`` and ``--batch_size``; ``--data-path`` and ``--data_path`` ...), and
``dest`` names are the original ones, so a checkpoint's ``args`` reads like the original's.

Flags whose default is ``None`` below take the DeiT value with ``--data-path`` and the demo value without it
(the embedded MNIST-5k demo needs a small input, few epochs and no flips); see :data:`DEIT_DEFAULTS` and
:data:`DEMO_DEFAULTS`.
"""
import argparse

from ..models import variant_choices
from .flag_types import (aa_policy, in_range, input_size, nonneg_float, nonneg_int, number, positive_float,
                         positive_int, seed)
from .sections import EVAL_FLAGS, SECTION_OF, SECTIONS
from .sections import bool_pair as _bool_pair, flag as _flag, group as _group, one_line_errors as _one_line_errors

__all__ = ["add_train_arguments", "add_shared_flags", "SECTIONS", "SECTION_OF", "EVAL_FLAGS", "DEIT_DEFAULTS",
           "DEMO_DEFAULTS", "DEFAULT_MODEL", "DEMO_MODEL"]

DEFAULT_MODEL = "spach_ms_s_patch4_224_conv"
DEMO_MODEL = "spach_ms_xxs_patch4_224_conv"

DEIT_DEFAULTS = dict(
    model=DEFAULT_MODEL, batch_size=128, epochs=300, input_size=224, lr=5e-4, warmup_epochs=20, cooldown_epochs=10,
    drop_path=0.1, model_ema=True, repeated_aug=True, aa="rand-m9-mstd0.5-inc1", color_jitter=0.4, reprob=0.25,
    mixup=0.8, cutmix=1.0, smoothing=0.1, hflip=0.5, crop_pct=None, num_workers=10, sched_per_step=False,
    scale=(0.08, 1.0),
)
# MNIST-5k at 32x32 on a CPU (~3.5 min on 2 cores): shifts (padded crops) but no flips, no mixing of digits, lr per step
DEMO_DEFAULTS = dict(
    model=DEMO_MODEL, batch_size=128, epochs=10, input_size=32, lr=8e-3, warmup_epochs=1, cooldown_epochs=0,
    drop_path=0.0, model_ema=False, repeated_aug=False, aa="none", color_jitter=0.0, reprob=0.0,
    mixup=0.0, cutmix=0.0, smoothing=0.1, hflip=0.0, crop_pct=1.0, num_workers=1, sched_per_step=True,
    scale=(0.08, 1.0),
)


INTERPOLATIONS = ["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming", "random"]


def add_train_arguments(parser: argparse.ArgumentParser, mode: str = "train"):
    """The flags of ``spach train`` (``mode="train"``) or only those evaluation reads (``mode="eval"``)."""
    _one_line_errors(parser)
    parser._spach_mode = mode
    parser.add_argument("--config", "-c", dest="config", action="append", default=[], metavar="FILE.yaml",
                        help="read settings from a YAML file (a run's config.yaml, or a flat / sectioned file of these "
                             "flags' names); may be given more than once: later files win, flags on the command line "
                             "win over files")
    d = "(default: DeiT {} / demo {})%(default).0s"  # the .0s keeps argparse from adding '(default: None)'

    def dd(key):
        return d.format(DEIT_DEFAULTS[key], DEMO_DEFAULTS[key])

    _data_flags(parser, dd)
    _model_flags(parser, dd)
    _optimizer_flags(parser, dd)
    _augmentation_flags(parser, dd)
    _distillation_flags(parser, dd)
    _run_flags(parser, dd)
    _device_flags(parser, dd)
    return parser


def add_shared_flags(parser, names):
    """Flags that ``spach benchmark`` shares with ``spach train``: the same spelling, default and validation."""
    for name in names:
        spellings, kwargs = _SHARED[name]
        _flag(parser, *spellings, **kwargs)


def _data_flags(parser, dd):
    g = _group(parser, "data")
    _flag(g, "--data-path", dest="data_path", default="", metavar="DIR",
          help="ImageFolder dataset with DIR/train/<class>/ and DIR/val/<class>/ (or the shard / HF dataset folder of "
               "--data-set WDS / HFDS); omitted: the embedded MNIST-5k demo", ev=True)
    _flag(g, "--data-set", dest="data_set", default="IMNET", choices=["IMNET", "WDS", "HFDS", "CIFAR", "INAT", "INAT19"],
          help="IMNET: ImageNet-layout folders; WDS: WebDataset tar shards with an _info.json index (`spach pack`); "
               "HFDS: a Hugging Face dataset on disk (save_to_disk folder or Hub-format copy); WDS / HFDS need "
               "`pip install 'spach[shards]'` (docs/TRAINING.md). CIFAR / INAT / INAT19 are refused with how to "
               "convert them", ev=True)
    _flag(g, "--inat-category", dest="inat_category", default="name", help=argparse.SUPPRESS, ev=True)  # with --data-set
    _flag(g, "--input-size", dest="input_size", type=input_size, default=None, help="image size " + dd("input_size"), ev=True)
    _flag(g, "--num_workers", dest="num_workers", type=nonneg_int, default=None,
          help="data loader worker processes per rank " + dd("num_workers"), ev=True)
    _bool_pair(g, "pin-mem", "pin_mem", True, "pin host memory for faster copies to the device", "do not pin memory", ev=True)
    _flag(g, "--strict-data", dest="strict_data", action="store_true",
          help="fail on an image that cannot be decoded instead of skipping (and counting) it", ev=True)
    _bool_pair(g, "repeated-aug", "repeated_aug", None, "repeated augmentation sampler (3 copies) " + dd("repeated_aug"),
               "plain shuffling")

    _flag(g, "--data-pipeline", dest="data_pipeline", default="timm", choices=["timm", "fast"],
          help="training decode + augment: 'timm' (PIL, the reference path) or 'fast' (same augmentation "
               "distribution; JPEG DCT-scaled decoding, uint8 until the device, normalise/erase on the device; "
               "2.2-2.3x per loader core with OpenCV, 1.3-1.65x with its PIL fallback; benchmarks/RESULTS.md)")

def _model_flags(parser, dd):
    g = _group(parser, "model")
    _flag(g, "--model", dest="model", default=None, metavar="MODEL",
          help="model name (`spach models` lists them; eval: read from the checkpoint) " + dd("model"), ev=True)
    _flag(g, "--drop", dest="drop", type=in_range(0, 1, high_open=True), default=0.0, help="dropout rate")
    _flag(g, "--drop-path", dest="drop_path", type=in_range(0, 1, high_open=True), default=None,
          help="stochastic depth rate (default: the model's own where its original registry fixed one, as for "
          f"sMLPNet and ShiftViT, shown by `spach models --json`; else DeiT {DEIT_DEFAULTS['drop_path']} / demo "
          f"{DEMO_DEFAULTS['drop_path']})%(default).0s")
    _bool_pair(g, "model-ema", "model_ema", None, "keep an EMA of the weights, evaluated each epoch " + dd("model_ema"),
               "no EMA")
    _flag(g, "--stem-type", dest="stem_type", default=None, choices=["conv1", "conv4"],
          help="patch-embedding stem (default: the model's own; conv4 on the hybrid MS-S gives Hybrid-MS-S+)", ev=True)
    _flag(g, "--shared-spatial-func", dest="shared_spatial_func", action="store_true",
          help="share one spatial mixer between the blocks of a stage (single-kind stages only)", ev=True)
    _flag(g, "--norm-layer", dest="norm_layer", default=None, choices=variant_choices("norm_layer"),
          help="ShiftViT's normalization: GN1 (GroupNorm, one group) or BN (BatchNorm) (default: the one the "
          "--finetune / --resume file holds, else GN1)", ev=True)
    _flag(g, "--act-layer", dest="act_layer", default=None, choices=variant_choices("act_layer"),
          help="ShiftViT's activation (default: GELU)", ev=True)
    _flag(g, "--model-ema-decay", dest="model_ema_decay", type=in_range(0, 1, True, True), default=0.99996)
    _flag(g, "--model-ema-force-cpu", dest="model_ema_force_cpu", action="store_true")


def _optimizer_flags(parser, dd):
    g = _group(parser, "optim")
    _flag(g, *_SHARED["batch_size"][0], **_SHARED["batch_size"][1], ev=True)
    _flag(g, *_SHARED["grad_accum_steps"][0], **_SHARED["grad_accum_steps"][1])
    _flag(g, "--global-batch", dest="global_batch_size", type=positive_int, default=None, metavar="G",
          help="the global batch to train at (the recipe's 1024 = 8 cards x 128): --grad-accum-steps becomes "
               "G / (--batch-size x processes), which must divide (default: --batch-size x accumulation x "
               "processes)%(default).0s")
    _flag(g, "--epochs", dest="epochs", type=positive_int, default=None, help="epochs " + dd("epochs"))
    _flag(g, "--opt", dest="opt", default="adamw", choices=["adamw", "sgd"])
    _flag(g, "--opt-eps", dest="opt_eps", type=in_range(0, 1, low_open=True), default=1e-8)
    _flag(g, "--opt-betas", dest="opt_betas", type=number, nargs="+", default=None)
    _flag(g, "--clip-grad", dest="clip_grad", type=positive_float, default=None, help="clip the gradient norm")
    _flag(g, "--momentum", dest="momentum", type=in_range(0, 1), default=0.9)
    _flag(g, "--weight-decay", dest="weight_decay", type=nonneg_float, default=0.05,
          help="AdamW weight decay (not applied to norms and biases)")
    _flag(g, "--sched", dest="sched", default="cosine", choices=["cosine"])
    _flag(g, "--lr-noise", dest="lr_noise", type=float, nargs="+", default=None,
          help="timm's lr noise: not supported (the SPACH recipe does not use it); giving it is an error")
    _flag(g, "--lr-noise-pct", dest="lr_noise_pct", type=float, default=0.67, help=argparse.SUPPRESS)
    _flag(g, "--lr-noise-std", dest="lr_noise_std", type=float, default=1.0, help=argparse.SUPPRESS)
    # step / plateau scheduler settings of the original parser: accepted so its command lines run; like
    # there, they have no effect on the cosine schedule
    _flag(g, "--decay-epochs", dest="decay_epochs", type=float, default=30, help=argparse.SUPPRESS)
    _flag(g, "--patience-epochs", dest="patience_epochs", type=int, default=10, help=argparse.SUPPRESS)
    _flag(g, "--decay-rate", "--dr", dest="decay_rate", type=float, default=0.1, help=argparse.SUPPRESS)
    _flag(g, "--lr", dest="lr", type=positive_float, default=None,
          help="learning rate for a global batch of 512, scaled linearly by batch x processes / 512 " + dd("lr"))
    _flag(g, "--warmup-lr", dest="warmup_lr", type=nonneg_float, default=1e-6)
    _flag(g, "--min-lr", dest="min_lr", type=nonneg_float, default=1e-5)
    _flag(g, "--warmup-epochs", dest="warmup_epochs", type=nonneg_float, default=None, help=dd("warmup_epochs"))
    _flag(g, "--cooldown-epochs", dest="cooldown_epochs", type=nonneg_float, default=None,
          help="final epochs at --min-lr " + dd("cooldown_epochs"))
    _bool_pair(g, "sched-per-step", "sched_per_step", None, "update the lr every step " + dd("sched_per_step"),
               "update the lr once per epoch (DeiT)")


def _augmentation_flags(parser, dd):
    g = _group(parser, "aug")
    _flag(g, "--color-jitter", dest="color_jitter", type=nonneg_float, default=None, help=dd("color_jitter"))
    _flag(g, "--aa", dest="aa", type=aa_policy, default=None, help="RandAugment policy, 'none' to disable " + dd("aa"))
    _flag(g, "--smoothing", dest="smoothing", type=in_range(0, 1, high_open=True), default=None, help="label smoothing " + dd("smoothing"))
    _flag(g, "--train-interpolation", dest="train_interpolation", default="bicubic", choices=INTERPOLATIONS)
    _flag(g, "--hflip", dest="hflip", type=in_range(0, 1), default=None, help="horizontal flip probability " + dd("hflip"))
    _flag(g, "--crop-pct", dest="crop_pct", type=in_range(0, 1, low_open=True), default=None,
          help="eval centre-crop fraction (default 0.875: resize 256, crop 224; demo 1.0)%(default).0s", ev=True)
    _flag(g, "--reprob", dest="reprob", type=in_range(0, 1), default=None, help="random erasing " + dd("reprob"))
    _flag(g, "--remode", dest="remode", default="pixel", choices=["pixel", "rand", "const"])
    _flag(g, "--recount", dest="recount", type=positive_int, default=1)
    _flag(g, "--resplit", dest="resplit", action="store_true", help=argparse.SUPPRESS)  # needs aug splits (unused)
    _flag(g, "--mixup", dest="mixup", type=nonneg_float, default=None, help="mixup alpha " + dd("mixup"))
    _flag(g, "--cutmix", dest="cutmix", type=nonneg_float, default=None, help="cutmix alpha " + dd("cutmix"))
    _flag(g, "--cutmix-minmax", dest="cutmix_minmax", type=number, nargs="+", default=None)
    _flag(g, "--mixup-prob", dest="mixup_prob", type=in_range(0, 1), default=1.0)
    _flag(g, "--mixup-switch-prob", dest="mixup_switch_prob", type=in_range(0, 1), default=0.5)
    _flag(g, "--mixup-mode", dest="mixup_mode", default="batch", choices=["batch", "pair", "elem"])


def _distillation_flags(parser, dd):
    g = _group(parser, "distill")
    _flag(g, "--teacher-model", dest="teacher_model", default="regnety_160", help="timm teacher model")
    _flag(g, "--teacher-path", dest="teacher_path", default="",
          help="teacher weights: a file or an http(s) URL (downloaded once into torch hub's cache)")
    _flag(g, "--distillation-type", dest="distillation_type", default="none", choices=["none", "soft", "hard"])
    _flag(g, "--distillation-alpha", dest="distillation_alpha", type=in_range(0, 1), default=0.5)
    _flag(g, "--distillation-tau", dest="distillation_tau", type=in_range(0, 1e6, low_open=True), default=1.0)
    _flag(g, "--finetune", dest="finetune", default="",
          help="start from these weights, a file or an http(s) URL (a mismatched classifier head is re-initialised)")


def _run_flags(parser, dd):
    g = _group(parser, "output")
    _flag(g, "--output_dir", dest="output_dir", default=None,
          help="where checkpoint.pth, best.pth and log.txt go (default: output/<model>-<dataset>; '' saves nothing)"
               "%(default).0s")
    _flag(g, "--resume", dest="resume", default="",
          help="resume from (or, with --eval, evaluate) this checkpoint: a file or an http(s) URL")
    _bool_pair(g, "auto-resume", "auto_resume", True, "resume from <output_dir>/checkpoint.pth when it exists",
               "always start afresh")
    _flag(g, "--start_epoch", dest="start_epoch", type=nonneg_int, default=0)
    _flag(g, "--recovery-interval", dest="recovery_interval", type=nonneg_int, default=0, metavar="N",
          help="also write recovery.pth every N optimizer steps inside an epoch (replacing the last one), so that a "
               "kill without warning loses at most N steps; 0: only at epoch ends and on SIGTERM / SIGUSR1 / SIGINT")
    _flag(g, "--checkpoint-hist", dest="checkpoint_hist", type=nonneg_int, default=0, metavar="K",
          help="also keep the K best epoch checkpoints as checkpoint-<epoch>.pth (timm's --checkpoint-hist), for "
               "`spach average`; 0: keep none")
    _flag(g, "--allow-batch-change", dest="allow_batch_change", action="store_true",
          help="resume even though the global batch differs from the checkpoint's (the lr is rescaled and the epoch's "
               "remaining samples are split into the new batches)")
    _flag(g, "--eval", dest="eval", action="store_true", help="only evaluate (--resume CKPT)")
    _flag(g, "--eval-ema", dest="eval_ema", action="store_true", help="with --eval: evaluate the checkpoint's EMA weights")
    _flag(g, "--dist-eval", dest="dist_eval", action="store_true", help="shard evaluation over the processes", ev=True)
    _flag(g, "--throughput", dest="throughput", action="store_true", help="only measure inference images/s", ev=True)
    _flag(g, "--seed", dest="seed", type=seed, default=0, ev=True)
    _flag(g, "--deterministic", dest="deterministic", action="store_true",
          help="deterministic algorithms (bit-reproducible CPU runs and resumes)", ev=True)
    _flag(g, "--results-file", dest="results_file", default="", metavar="F.csv|F.json",
          help="evaluation: append this checkpoint's top-1 / top-5 / loss as one row to a CSV or JSON file "
               "(timm validate.py's columns), so that a sweep collects its results in one file", ev=True)
    _flag(g, "--print-freq", dest="print_freq", type=positive_int, default=10, help="log every N steps", ev=True)
    _flag(g, "--log-interval", dest="log_interval", type=positive_int, default=None,
          help="send the step's loss, lr, images/s and memory to the trackers every N optimizer steps "
               "(default: --print-freq)%(default).0s")
    _flag(g, "--log-grad-norm", dest="log_grad_norm", action="store_true",
          help="also log the gradient norm (always logged with --clip-grad)")
    _flag(g, "--tensorboard", dest="tensorboard", action="store_true",
          help="also write the step and epoch scalars to <output_dir>/tensorboard (pip install 'spach[tensorboard]')")
    _flag(g, "--log-wandb", dest="log_wandb", action="store_true",
          help="log to Weights & Biases (offline into <output_dir>/wandb when no API key is set; WANDB_MODE "
               "overrides; pip install 'spach[wandb]')")
    _flag(g, "--wandb-project", dest="wandb_project", default="spach", help="W&B project")
    _flag(g, "--wandb-name", dest="wandb_name", default="", help="W&B run name (default: W&B's)")
    _flag(g, "--wandb-tags", dest="wandb_tags", default="", help="W&B tags, comma-separated")
    _flag(g, "--mlflow-uri", dest="mlflow_uri", default="",
          help="log to this MLflow tracking server or store (http://host:5000, file:./mlruns ...; "
               "pip install 'spach[mlflow]')")
    _flag(g, "--mlflow-experiment", dest="mlflow_experiment", default="spach", help="MLflow experiment name")
    _flag(g, "--mlflow-run-name", dest="mlflow_run_name", default="", help="MLflow run name (default: MLflow's)")
    _flag(g, "--mlflow-log-best", dest="mlflow_log_best", action="store_true",
          help="also upload best.pth to MLflow as an artifact (config.yaml and log.txt always are)")


# flags `spach benchmark` takes too: declared once (spellings, default, validation), help included
_SHARED = {
    "batch_size": (("--batch-size",), dict(dest="batch_size", type=positive_int, default=None,
                                           help="batch size per process (default: spach train: DeiT 128 / demo 128; "
                                                "spach benchmark: 128 on cuda, 16 on cpu)%(default).0s")),
    "grad_accum_steps": (("--grad-accum-steps",), dict(
        dest="grad_accum_steps", type=positive_int, default=None,
        help="accumulate the gradients of N batches per optimizer step: global batch = --batch-size x N x processes "
             "(default 1, or what --global-batch implies; spach benchmark: images/s counts all N)%(default).0s")),
    "device": (("--device",), dict(dest="device", default=None,
                                   help="cuda | npu | cpu | mps, optionally with an index (cuda:1) (default: the best "
                                        "available)%(default).0s")),
    "amp": (("--amp",), dict(dest="amp", default=None, choices=["bf16", "fp16", "off"],
                             help="mixed precision (default: bf16 where supported: cuda/npu with bf16, CPUs with "
                                  "AVX512-BF16/AMX; else fp16 on cuda/npu, off on other CPUs and mps)%(default).0s")),
    "channels_last": (("--channels-last",), dict(dest="channels_last", action="store_true", help="NHWC memory format")),
    "compile": (("--compile",), dict(dest="compile", action="store_true", help="torch.compile the model")),
    "grad_checkpointing": (("--grad-checkpointing",), dict(
        dest="grad_checkpointing", action="store_true",
        help="recompute each block's activations in backward: same results, far less memory (benchmarks/RESULTS.md)")),
}


def _device_flags(parser, dd):
    g = _group(parser, "device")
    _flag(g, *_SHARED["device"][0], **_SHARED["device"][1], ev=True)
    _flag(g, "--npu", dest="npu", action="store_true", help="alias of --device npu", ev=True)
    _flag(g, *_SHARED["amp"][0], **_SHARED["amp"][1], ev=True)
    _flag(g, *_SHARED["channels_last"][0], **_SHARED["channels_last"][1], ev=True)
    _flag(g, *_SHARED["grad_checkpointing"][0], **_SHARED["grad_checkpointing"][1])
    _flag(g, *_SHARED["compile"][0], **_SHARED["compile"][1], ev=True)
    _flag(g, "--sync-bn", dest="sync_bn", action="store_true",
          help="synchronise BatchNorm statistics across processes (models with BatchNorm, under torchrun)")
    _flag(g, "--world_size", dest="world_size", type=int, default=1, help="set by torchrun (WORLD_SIZE)", ev=True)
    _flag(g, "--dist_url", dest="dist_url", default="env://", help="kept for compatibility; torchrun's env:// is used",
          ev=True)
    _flag(g, "--local_rank", "--local-rank", dest="local_rank", type=int, default=0, help=argparse.SUPPRESS, ev=True)
