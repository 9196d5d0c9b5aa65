"""Train a SPACH model with the DeiT recipe on an ImageFolder dataset (one process, or many under torchrun).

Without --data-path it trains on the embedded MNIST-5k demo (shipped inside spach). A rerun of the same command
resumes from <output_dir>/checkpoint.pth; <output_dir>/config.yaml holds the resolved settings (--config reruns
them). Multi-card: torchrun --nproc_per_node 8 -m spach train ...
"""
from ..train.args import add_train_arguments


def add_arguments(parser):
    parser.usage = "spach train [options]   (spach train --help lists them)"
    add_train_arguments(parser)


def run(args) -> int:
    from ..train.runner import run as run_training
    return run_training(args)
