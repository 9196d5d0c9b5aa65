"""Evaluate a checkpoint on the val/ split of a dataset (the same engine as `spach train --eval`).

spach eval --checkpoint output/<run>/best.pth [--data-path DIR] [--model M]; the model, input size and crop are
read from a training checkpoint when not given. Official release files work too (pass --model).
"""
from ..train.args import add_train_arguments


def add_arguments(parser):
    parser.usage = "spach eval [options]   (spach eval --help lists them)"
    parser.add_argument("--checkpoint", "--resume", dest="resume", default="", metavar="CKPT",
                        help="weights to evaluate (training checkpoint, official .pth, or .safetensors; a file or "
                             "an http(s) URL)")
    add_train_arguments(parser, mode="eval")
    parser.add_argument("--ema", "--eval-ema", "--eval_ema", dest="eval_ema", action="store_true",
                        help="evaluate the checkpoint's EMA weights")
    parser.set_defaults(eval=True)


def run(args) -> int:
    from ..train.runner import run as run_training
    return run_training(args, mode="eval")
