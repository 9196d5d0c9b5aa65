"""``--config FILE.yaml`` in and ``<output_dir>/config.yaml`` out.

A config file holds flags by their ``dest`` names (``batch_size``, ``drop_path``; dashes are read as
underscores), either flat (as timm's ``args.yaml``) or grouped under the section names that ``config.yaml``
uses (``data``, ``model``, ``optim``, ``aug``, ``distill``, ``output``, ``device``). Every value goes through
the same validation as the flag on the command line. An unknown key, a key in the wrong section, or a value of
the wrong type is one line naming the file, the key, the value and what is expected.
"""
import argparse
import dataclasses
import difflib
import functools
from typing import Dict, Iterable, Tuple

from ..errors import SpachError
from ..files import regular_file_problem
from .args import DEIT_DEFAULTS, SECTION_OF, SECTIONS, add_train_arguments

__all__ = ["parser_defaults", "explicit_dests", "read_config_files", "config_yaml"]

# keys a file may set that have no flag: recipe-table values (RandomResizedCrop's area range)
_EXTRA = {"scale": "aug"}
# flags that are not part of a run's configuration
_NOT_SETTINGS = {"config"}


@functools.lru_cache(maxsize=1)
def _train_actions() -> Dict[str, argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False)
    add_train_arguments(parser, "train")
    actions = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)
    return actions


def parser_defaults() -> dict:
    """Every setting's parser default (None where the recipe table decides), ``scale`` included."""
    out = {dest: a.default for dest, a in _train_actions().items() if dest not in _NOT_SETTINGS}
    out["scale"] = None
    out["config"] = []
    return out


def explicit_dests(parser: argparse.ArgumentParser, argv) -> set:
    """The dests named on the command line ``argv`` (the words after the sub-command, or all of them)."""
    words = list(argv)
    if parser.prog.split()[-1] in words:
        words = words[words.index(parser.prog.split()[-1]) + 1:]
    saved = [(a, a.default) for a in parser._actions]
    saved_defaults, parser._defaults = parser._defaults, {}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        ns, _ = parser.parse_known_args(words)
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults = saved_defaults
    return set(vars(ns))


def _closest(key: str) -> str:
    known = list(_train_actions()) + list(_EXTRA)
    close = difflib.get_close_matches(key, [k for k in known if k not in _NOT_SETTINGS and k != "help"], n=1)
    return f" (did you mean '{close[0]}'?)" if close else " (`spach train --help` lists the flags; keys are their names)"


def _bad(path, key, value, expected) -> SpachError:
    return SpachError(f"config {path}: {key}: {value!r:.60} is not valid: expected {expected}; nothing was started")


def _scalar(path, key, value, action):
    if isinstance(value, (dict, list)):
        raise _bad(path, key, value, "a single value")
    if action.type is None:
        if not isinstance(value, str):
            raise _bad(path, key, value, "a string" + (f", one of {', '.join(map(str, action.choices))}"
                                                       if action.choices else ""))
        converted = value
    else:
        if isinstance(value, bool):
            raise _bad(path, key, value, getattr(action.type, "__name__", "a number").replace("_", " "))
        try:
            converted = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            what = str(e) or f"{value!r:.60} is not a valid {getattr(action.type, '__name__', 'value')}"
            raise SpachError(f"config {path}: {key}: {what} (as for its flag); nothing was started") from None
    if action.choices is not None and converted not in action.choices:
        raise _bad(path, key, value, f"one of {', '.join(map(str, action.choices))}")
    return converted


def _convert(path, key, value):
    """A file's ``value`` for ``key``, validated as the flag's parser validates it."""
    if key == "scale":
        ok = (isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value) and 0 < value[0] <= value[1] <= 1)
        if not ok:
            raise _bad(path, key, value, "two numbers MIN MAX with 0 < MIN <= MAX <= 1, e.g. [0.08, 1.0]")
        return tuple(float(x) for x in value)
    action = _train_actions()[key]
    if value is None:
        if action.default is None:
            return None  # the recipe default, as when the flag is left out
        raise _bad(path, key, value, f"a value (the default is {action.default!r})")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise _bad(path, key, value, "true or false")
        return value
    if action.nargs in ("+", "*"):
        if not isinstance(value, (list, tuple)) or (action.nargs == "+" and not value):
            raise _bad(path, key, value, "a list, e.g. [0.9, 0.999]")
        return tuple(_scalar(path, key, x, action) for x in value)
    return _scalar(path, key, value, action)


def _entries(path, data) -> Iterable[Tuple[str, object]]:
    """``(key, value)`` of a flat or sectioned mapping; a key in the wrong section is refused."""
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            for raw_inner, inner in value.items():
                inner_key = str(raw_inner).replace("-", "_")
                home = _EXTRA.get(inner_key) or SECTION_OF.get(inner_key)
                if home is not None and home != key and inner_key not in _NOT_SETTINGS:
                    raise SpachError(f"config {path}: {inner_key} belongs in the '{home}' section, not in '{key}': "
                                     f"move it (or write it at the top level)")
                yield inner_key, inner
        else:
            yield key, value


def _read_one(path: str) -> dict:
    import yaml
    _train_actions()  # declares every flag's section
    problem = regular_file_problem(path)
    if problem:
        raise SpachError(f"--config {path} {problem}: pass the path of a YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise SpachError(f"--config {path} cannot be read ({getattr(e, 'strerror', None) or e}): "
                         f"fix the path or the file") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise SpachError(f"--config {path} is not valid YAML{at} ({getattr(e, 'problem', None) or e}): "
                         f"fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpachError(f"--config {path} holds a {type(data).__name__}, not a mapping of settings: "
                         f"write `key: value` lines (e.g. `batch_size: 64`)")
    out = {}
    for key, value in _entries(path, data):
        if key in _NOT_SETTINGS:
            raise SpachError(f"config {path}: '{key}' cannot be set inside a config file: pass every file with "
                             f"--config on the command line")
        if key not in _train_actions() and key not in _EXTRA:
            raise SpachError(f"config {path}: unknown key '{key}'{_closest(key)}; nothing was started")
        out[key] = _convert(path, key, value)
    return out


def read_config_files(paths) -> Dict[str, Tuple[object, str]]:
    """``key -> (value, "config FILE")`` from the files in order (later files win)."""
    out = {}
    for path in paths:
        for key, value in _read_one(path).items():
            out[key] = (value, f"config {path}")
    return out


def _yaml_value(value) -> str:
    import yaml
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip()
    return text[:-4].rstrip() if text.endswith("\n...") or text.endswith(" ...") else text


def config_yaml(cfg, header: Iterable[str] = ()) -> str:
    """``config.yaml``'s text: ``header`` comment lines, then every setting by section, each value not at its
    default followed by where it came from; derived values (the scaled lr, the global batch, the device kind)
    as comments. ``spach train --config`` reads it back to the same configuration."""
    lines = [f"# {line}" for line in header]
    for key, section in cfg.sections():
        lines.append(f"{key}:  # {SECTIONS[key]}")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            source = cfg.sources.get(f.name, "default")
            if f.metadata.get("derived"):
                lines.append(f"  # {f.name}: {_yaml_value(value)}  ({source})")
                continue
            note = "" if source == "default" else f"  # {source}"
            lines.append(f"  {f.name}: {_yaml_value(value)}{note}")
    return "\n".join(lines) + "\n"


assert set(DEIT_DEFAULTS) <= set(parser_defaults()) | set(_EXTRA), "a recipe default without a setting"
