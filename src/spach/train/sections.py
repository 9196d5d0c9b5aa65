"""The sections of ``spach train``'s flags: each flag is declared once, in one section (the run configuration's
dataclass of the same name, :mod:`spach.train.config`), under its dashed and underscored spellings, marked when
``spach eval`` takes it too."""
import argparse

__all__ = ["SECTIONS", "SECTION_OF", "EVAL_FLAGS", "flag", "bool_pair", "group", "one_line_errors"]


def flag(parser, *names, **kwargs):
    """Add a flag under its dashed and underscored spellings."""
    spellings = []
    for n in names:
        spellings.append(n)
        alt = "--" + n[2:].replace("-", "_") if "-" in n[2:] else "--" + n[2:].replace("_", "-")
        if alt != n and alt not in spellings and alt not in names:
            spellings.append(alt)
    parser.add_argument(*spellings, **kwargs)


def bool_pair(parser, name, dest, default, help_on, help_off, **kwargs):
    parser.add_argument(f"--{name}", f"--{name.replace('-', '_')}", dest=dest, action="store_true", default=default,
                        help=help_on, **kwargs)
    parser.add_argument(f"--no-{name}", f"--no_{name.replace('-', '_')}", dest=dest, action="store_false",
                        help=help_off, **kwargs)


def one_line_errors(parser: argparse.ArgumentParser):
    """A bad flag value is reported on one line (argparse would print the usage line first)."""
    def error(message):
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    parser.error = error


# the sections of the run's configuration (spach.train.config), in the order --help and config.yaml show them
SECTIONS = {
    "data": "data",
    "model": "model",
    "optim": "optimisation and schedule",
    "aug": "augmentation and regularisation",
    "distill": "distillation and fine-tuning",
    "output": "output and logging",
    "device": "device and precision",
}
SECTION_OF = {}   # flag dest -> section key: filled as the flags are declared, one declaration per flag
EVAL_FLAGS = set()  # the dests `spach eval` takes (its --help lists only these)


class _Section:
    """One section's argparse group. Each flag says whether evaluation uses it (``ev=True``); under
    ``spach eval`` the others are not added, so its --help lists only what evaluation reads."""

    def __init__(self, parser, key: str, mode: str):
        self.group = parser.add_argument_group(SECTIONS[key])
        self.key, self.mode = key, mode

    def add_argument(self, *names, ev: bool = False, **kwargs):
        dest = kwargs["dest"]
        SECTION_OF.setdefault(dest, self.key)
        if ev:
            EVAL_FLAGS.add(dest)
        if self.mode == "eval" and not ev:
            return None
        return self.group.add_argument(*names, **kwargs)


def group(parser, key: str) -> _Section:
    return _Section(parser, key, getattr(parser, "_spach_mode", "train"))
