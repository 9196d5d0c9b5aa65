"""The one flag parser of ``spach train`` / ``spach eval``: the DeiT / SPACH ``main.py`` flags and defaults.

Both spellings are accepted (``--batch-size`` and ``--batch_size``; ``--data-path`` and ``--data_path`` ...), and
``dest`` names are the original ones, so a checkpoint's ``args`` reads like the original's.

Flags whose default is ``None`` below take the DeiT value with ``--data-path`` and the demo value without it
(the embedded MNIST-5k demo needs a small input, few epochs and no flips); see :data:`DEIT_DEFAULTS` and
:data:`DEMO_DEFAULTS`.
"""
import argparse

from ..models import variant_choices

__all__ = ["add_train_arguments", "check_flag_combinations", "DEIT_DEFAULTS", "DEMO_DEFAULTS", "DEFAULT_MODEL", "DEMO_MODEL"]

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


def _flag(parser, *names, **kwargs):
    """Add a flag under its dashed and underscored spellings."""
    spellings = []
    for n in names:
        spellings.append(n)
        alt = "--" + n[2:].replace("-", "_") if "-" in n[2:] else "--" + n[2:].replace("_", "-")
        if alt != n and alt not in spellings and alt not in names:
            spellings.append(alt)
    parser.add_argument(*spellings, **kwargs)


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _nonneg_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _number(text) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def _in_range(low, high, low_open=False, high_open=False):
    """A float flag in [low, high] (an end excluded where open): a value outside fails at parse time, not
    epochs later inside an augmentation or an optimizer."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")

    def parse(text):
        v = _number(text)
        if v < low or v > high or (low_open and v == low) or (high_open and v == high):
            raise argparse.ArgumentTypeError(f"must be in {lo}{low:g}, {high:g}{hi}, got {text}")
        return v
    parse.__name__ = f"number in {lo}{low:g}, {high:g}{hi}"
    return parse


def _input_size(text):
    from ..models.sizes import MAX_INPUT_SIZE
    v = _positive_int(text)
    if v > MAX_INPUT_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_INPUT_SIZE}, got {v}")
    return v


def _aa(text):
    from ..data.transforms import check_aa_policy
    try:
        check_aa_policy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


INTERPOLATIONS = ["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming", "random"]


def check_flag_combinations(args):
    """What one flag's parser cannot see: multi-value flags and flags that constrain each other. Runs before
    anything is built or written; raises ``ValueError`` with the flag named."""
    if args.opt_betas is not None and not (len(args.opt_betas) == 2 and all(0 <= b < 1 for b in args.opt_betas)):
        raise ValueError(f"--opt-betas takes two numbers in [0, 1) (e.g. 0.9 0.999), got {args.opt_betas}")
    if args.cutmix_minmax is not None and not (len(args.cutmix_minmax) == 2
                                               and 0 < args.cutmix_minmax[0] < args.cutmix_minmax[1] <= 1):
        raise ValueError(f"--cutmix-minmax takes two fractions MIN MAX with 0 < MIN < MAX <= 1, got "
                         f"{args.cutmix_minmax}")


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _nonneg_float(text):
    v = _number(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _bool_pair(parser, name, dest, default, help_on, help_off):
    parser.add_argument(f"--{name}", f"--{name.replace('-', '_')}", dest=dest, action="store_true", default=default,
                        help=help_on)
    parser.add_argument(f"--no-{name}", f"--no_{name.replace('-', '_')}", dest=dest, action="store_false",
                        help=help_off)


def _one_line_errors(parser: argparse.ArgumentParser):
    """A bad flag value is reported on one line (argparse would print the usage line first)."""
    def error(message):
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    parser.error = error


def add_train_arguments(parser: argparse.ArgumentParser):
    _one_line_errors(parser)
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


def _data_flags(parser, dd):
    g = parser.add_argument_group("data")
    _flag(g, "--data-path", dest="data_path", default="", metavar="DIR",
          help="ImageFolder dataset with DIR/train/<class>/ and DIR/val/<class>/ (or the shard / HF dataset folder of "
               "--data-set WDS / HFDS); omitted: the embedded MNIST-5k demo")
    _flag(g, "--data-set", dest="data_set", default="IMNET", choices=["IMNET", "WDS", "HFDS", "CIFAR", "INAT", "INAT19"],
          help="IMNET: ImageNet-layout folders; WDS: WebDataset tar shards with an _info.json index (`spach pack`); "
               "HFDS: a Hugging Face dataset on disk (save_to_disk folder or Hub-format copy); WDS / HFDS need "
               "`pip install 'spach[shards]'` (docs/TRAINING.md). CIFAR / INAT / INAT19 are refused with how to "
               "convert them")
    _flag(g, "--inat-category", dest="inat_category", default="name", help=argparse.SUPPRESS)  # with --data-set
    _flag(g, "--input-size", dest="input_size", type=_input_size, default=None, help="image size " + dd("input_size"))
    _flag(g, "--num_workers", dest="num_workers", type=_nonneg_int, default=None,
          help="data loader worker processes per rank " + dd("num_workers"))
    _bool_pair(g, "pin-mem", "pin_mem", True, "pin host memory for faster copies to the device", "do not pin memory")
    _flag(g, "--strict-data", dest="strict_data", action="store_true",
          help="fail on an image that cannot be decoded instead of skipping (and counting) it")
    _bool_pair(g, "repeated-aug", "repeated_aug", None, "repeated augmentation sampler (3 copies) " + dd("repeated_aug"),
               "plain shuffling")


def _model_flags(parser, dd):
    g = parser.add_argument_group("model")
    _flag(g, "--model", dest="model", default=None, metavar="MODEL",
          help="model name (`spach models` lists them; eval: read from the checkpoint) " + dd("model"))
    _flag(g, "--drop", dest="drop", type=_in_range(0, 1, high_open=True), default=0.0, help="dropout rate")
    _flag(g, "--drop-path", dest="drop_path", type=_in_range(0, 1, high_open=True), default=None,
          help="stochastic depth rate (default: the model's own where its original registry fixed one, as for "
          f"sMLPNet and ShiftViT, shown by `spach models --json`; else DeiT {DEIT_DEFAULTS['drop_path']} / demo "
          f"{DEMO_DEFAULTS['drop_path']})%(default).0s")
    _bool_pair(g, "model-ema", "model_ema", None, "keep an EMA of the weights, evaluated each epoch " + dd("model_ema"),
               "no EMA")
    _flag(g, "--stem-type", dest="stem_type", default=None, choices=["conv1", "conv4"],
          help="patch-embedding stem (default: the model's own; conv4 on the hybrid MS-S gives Hybrid-MS-S+)")
    _flag(g, "--shared-spatial-func", dest="shared_spatial_func", action="store_true",
          help="share one spatial mixer between the blocks of a stage (single-kind stages only)")
    _flag(g, "--norm-layer", dest="norm_layer", default=None, choices=variant_choices("norm_layer"),
          help="ShiftViT's normalization: GN1 (GroupNorm, one group) or BN (BatchNorm) (default: the one the "
          "--finetune / --resume file holds, else GN1)")
    _flag(g, "--act-layer", dest="act_layer", default=None, choices=variant_choices("act_layer"),
          help="ShiftViT's activation (default: GELU)")
    _flag(g, "--model-ema-decay", dest="model_ema_decay", type=_in_range(0, 1, True, True), default=0.99996)
    _flag(g, "--model-ema-force-cpu", dest="model_ema_force_cpu", action="store_true")


def _optimizer_flags(parser, dd):
    g = parser.add_argument_group("optimizer and schedule")
    _flag(g, "--batch-size", dest="batch_size", type=_positive_int, default=None,
          help="batch size per process " + dd("batch_size"))
    _flag(g, "--epochs", dest="epochs", type=_positive_int, default=None, help="epochs " + dd("epochs"))
    _flag(g, "--opt", dest="opt", default="adamw", choices=["adamw", "sgd"])
    _flag(g, "--opt-eps", dest="opt_eps", type=_in_range(0, 1, low_open=True), default=1e-8)
    _flag(g, "--opt-betas", dest="opt_betas", type=_number, nargs="+", default=None)
    _flag(g, "--clip-grad", dest="clip_grad", type=_positive_float, default=None, help="clip the gradient norm")
    _flag(g, "--momentum", dest="momentum", type=_in_range(0, 1), default=0.9)
    _flag(g, "--weight-decay", dest="weight_decay", type=_nonneg_float, default=0.05,
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
    _flag(g, "--lr", dest="lr", type=_positive_float, default=None,
          help="learning rate for a global batch of 512, scaled linearly by batch x processes / 512 " + dd("lr"))
    _flag(g, "--warmup-lr", dest="warmup_lr", type=_nonneg_float, default=1e-6)
    _flag(g, "--min-lr", dest="min_lr", type=_nonneg_float, default=1e-5)
    _flag(g, "--warmup-epochs", dest="warmup_epochs", type=_nonneg_float, default=None, help=dd("warmup_epochs"))
    _flag(g, "--cooldown-epochs", dest="cooldown_epochs", type=_nonneg_float, default=None,
          help="final epochs at --min-lr " + dd("cooldown_epochs"))
    _bool_pair(g, "sched-per-step", "sched_per_step", None, "update the lr every step " + dd("sched_per_step"),
               "update the lr once per epoch (DeiT)")


def _augmentation_flags(parser, dd):
    g = parser.add_argument_group("augmentation")
    _flag(g, "--color-jitter", dest="color_jitter", type=_nonneg_float, default=None, help=dd("color_jitter"))
    _flag(g, "--aa", dest="aa", type=_aa, default=None, help="RandAugment policy, 'none' to disable " + dd("aa"))
    _flag(g, "--smoothing", dest="smoothing", type=_in_range(0, 1, high_open=True), default=None, help="label smoothing " + dd("smoothing"))
    _flag(g, "--train-interpolation", dest="train_interpolation", default="bicubic", choices=INTERPOLATIONS)
    _flag(g, "--hflip", dest="hflip", type=_in_range(0, 1), default=None, help="horizontal flip probability " + dd("hflip"))
    _flag(g, "--crop-pct", dest="crop_pct", type=_in_range(0, 1, low_open=True), default=None,
          help="eval centre-crop fraction (default 0.875: resize 256, crop 224; demo 1.0)%(default).0s")
    _flag(g, "--reprob", dest="reprob", type=_in_range(0, 1), default=None, help="random erasing " + dd("reprob"))
    _flag(g, "--remode", dest="remode", default="pixel", choices=["pixel", "rand", "const"])
    _flag(g, "--recount", dest="recount", type=_positive_int, default=1)
    _flag(g, "--resplit", dest="resplit", action="store_true", help=argparse.SUPPRESS)  # needs aug splits (unused)
    _flag(g, "--mixup", dest="mixup", type=_nonneg_float, default=None, help="mixup alpha " + dd("mixup"))
    _flag(g, "--cutmix", dest="cutmix", type=_nonneg_float, default=None, help="cutmix alpha " + dd("cutmix"))
    _flag(g, "--cutmix-minmax", dest="cutmix_minmax", type=_number, nargs="+", default=None)
    _flag(g, "--mixup-prob", dest="mixup_prob", type=_in_range(0, 1), default=1.0)
    _flag(g, "--mixup-switch-prob", dest="mixup_switch_prob", type=_in_range(0, 1), default=0.5)
    _flag(g, "--mixup-mode", dest="mixup_mode", default="batch", choices=["batch", "pair", "elem"])


def _distillation_flags(parser, dd):
    g = parser.add_argument_group("distillation and fine-tuning")
    _flag(g, "--teacher-model", dest="teacher_model", default="regnety_160", help="timm teacher model")
    _flag(g, "--teacher-path", dest="teacher_path", default="",
          help="teacher weights: a file or an http(s) URL (downloaded once into torch hub's cache)")
    _flag(g, "--distillation-type", dest="distillation_type", default="none", choices=["none", "soft", "hard"])
    _flag(g, "--distillation-alpha", dest="distillation_alpha", type=_in_range(0, 1), default=0.5)
    _flag(g, "--distillation-tau", dest="distillation_tau", type=_in_range(0, 1e6, low_open=True), default=1.0)
    _flag(g, "--finetune", dest="finetune", default="",
          help="start from these weights, a file or an http(s) URL (a mismatched classifier head is re-initialised)")


def _run_flags(parser, dd):
    g = parser.add_argument_group("run")
    _flag(g, "--output_dir", dest="output_dir", default=None,
          help="where checkpoint.pth, best.pth and log.txt go (default: output/<model>-<dataset>; '' saves nothing)"
               "%(default).0s")
    _flag(g, "--resume", dest="resume", default="",
          help="resume from (or, with --eval, evaluate) this checkpoint: a file or an http(s) URL")
    _bool_pair(g, "auto-resume", "auto_resume", True, "resume from <output_dir>/checkpoint.pth when it exists",
               "always start afresh")
    _flag(g, "--start_epoch", dest="start_epoch", type=_nonneg_int, default=0)
    _flag(g, "--eval", dest="eval", action="store_true", help="only evaluate (--resume CKPT)")
    _flag(g, "--eval-ema", dest="eval_ema", action="store_true", help="with --eval: evaluate the checkpoint's EMA weights")
    _flag(g, "--dist-eval", dest="dist_eval", action="store_true", help="shard evaluation over the processes")
    _flag(g, "--throughput", dest="throughput", action="store_true", help="only measure inference images/s")
    _flag(g, "--seed", dest="seed", type=int, default=0)
    _flag(g, "--deterministic", dest="deterministic", action="store_true",
          help="deterministic algorithms (bit-reproducible CPU runs and resumes)")
    _flag(g, "--print-freq", dest="print_freq", type=_positive_int, default=10, help="log every N steps")
    _flag(g, "--tensorboard", dest="tensorboard", action="store_true",
          help="also write each epoch's stats as TensorBoard scalars to <output_dir>/tensorboard "
               "(pip install 'spach[tensorboard]')")


def _device_flags(parser, dd):
    g = parser.add_argument_group("device")
    _flag(g, "--device", dest="device", default=None, help="cuda | npu | cpu | mps (default: the best available)%(default).0s")
    _flag(g, "--npu", dest="npu", action="store_true", help="alias of --device npu")
    _flag(g, "--amp", dest="amp", default=None, choices=["bf16", "fp16", "off"],
          help="mixed precision (default: bf16 where supported: cuda/npu with bf16, CPUs with AVX512-BF16/AMX; else fp16 on cuda/npu, off on other CPUs and mps)%(default).0s")
    _flag(g, "--channels-last", dest="channels_last", action="store_true", help="NHWC memory format")
    _flag(g, "--grad-checkpointing", dest="grad_checkpointing", action="store_true",
          help="recompute each block's activations in backward: same results, far less memory (benchmarks/RESULTS.md)")
    _flag(g, "--data-pipeline", dest="data_pipeline", default="timm", choices=["timm", "fast"],
          help="training decode + augment: 'timm' (PIL, the reference path) or 'fast' (same augmentation "
               "distribution; JPEG DCT-scaled decoding, uint8 until the device, normalise/erase on the device; "
               "2.2-2.3x per loader core with OpenCV, 1.3-1.65x with its PIL fallback; benchmarks/RESULTS.md)")
    _flag(g, "--compile", dest="compile", action="store_true", help="torch.compile the model")
    _flag(g, "--world_size", dest="world_size", type=int, default=1, help="set by torchrun (WORLD_SIZE)")
    _flag(g, "--dist_url", dest="dist_url", default="env://", help="kept for compatibility; torchrun's env:// is used")
    _flag(g, "--local_rank", "--local-rank", dest="local_rank", type=int, default=0, help=argparse.SUPPRESS)
