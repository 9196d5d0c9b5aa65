"""The ``spach`` command line: ``spach train | eval | benchmark | models | average | export | plot | predict | pack | push``.

Each sub-command lives in its own module under :mod:`spach.commands` exposing ``add_arguments(parser)``
and ``run(args) -> int``; a module is imported only when its command runs (or its ``--help`` is asked for), so
``spach --help`` imports none and ``spach models`` only its own.
"""
import argparse
import importlib
import os
import sys
import warnings

from .errors import SpachError

COMMANDS = {
    "train": ("spach.commands.train", "train a SPACH model (DeiT recipe) on an ImageFolder dataset"),
    "eval": ("spach.commands.evaluate", "evaluate a checkpoint on the val/ split of a dataset"),
    "benchmark": ("spach.commands.benchmark", "measure training / inference throughput"),
    "models": ("spach.commands.models", "list the SPACH models: params, GFLOPs, published top-1"),
    "average": ("spach.commands.average", "average the weights of a run's best epoch checkpoints (--checkpoint-hist)"),
    "export": ("spach.commands.export", "export a model to ONNX, safetensors, TorchScript or a Hugging Face folder"),
    "plot": ("spach.commands.plot", "plot loss / accuracy / lr curves from output folders"),
    "predict": ("spach.commands.predict", "top-k classes of image files or folders, shown or written to CSV / JSON"),
    "pack": ("spach.commands.pack", "write an ImageFolder as WebDataset tar shards (for --data-set WDS)"),
    "push": ("spach.commands.push", "upload an exported Hugging Face model folder to the Hub"),
}


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (what is wrong and where the help is), not a usage wall."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(command=None):
    """The ``spach`` parser. Every sub-command is listed; only ``command``'s module is imported and given its
    flags (all of them when ``command`` is None, as for documentation and tests that parse several commands)."""
    parser = OneLineArgumentParser(prog="spach", description="SPACH: train, evaluate and benchmark "
                                     "CNN / Transformer / MLP mixing networks")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"spach {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_text)  # listed in `spach --help`; not imported
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("spach.commands"):
                continue  # command not part of this build
            raise
        p = sub.add_parser(name, help=help_text, description=getattr(module, "__doc__", None),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def _command_of(argv):
    """The sub-command named in ``argv`` (its first word that is not an option), or "" when there is none."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else ""
    return ""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # timm < 1.0.31 applies torch.jit.interface at import, which recent torch flags as deprecated on every
    # start-up; the warning concerns timm's code, and on the command line it would be a second line around
    # one-line errors.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)
    parser = build_parser(_command_of(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the sub-command, whose --help lists its flags
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args._argv = argv  # the command line as typed: the run's configuration tells flags given from defaults
    try:
        return int(args._run(args) or 0)
    except SpachError as e:
        rank = os.environ.get("RANK")
        prefix = "spach: error: " if rank in (None, "0") else f"spach: error (rank {rank}): "
        print(prefix + str(e), file=sys.stderr)
        return e.exit_code
    except MemoryError as e:  # torch.OutOfMemoryError (a device's memory) derives from RuntimeError: see below
        print(f"spach: error: out of host memory ({str(e)[:120] or 'MemoryError'}): lower --batch-size (or the input "
              f"size); a training run resumes from its last checkpoint when rerun", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":
            raise
        print(f"spach: error: out of device memory ({str(e).splitlines()[0][:160]}): lower --batch-size (or the "
              f"input size); a training run resumes from its last checkpoint when rerun", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spach: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
