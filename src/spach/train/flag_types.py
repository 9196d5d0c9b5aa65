"""Value types of the run's flags: each one's parser validates a command-line word (and a config file's value,
which goes through the same parser), so a value out of range fails before anything is built."""
import argparse

__all__ = ["seed", "positive_int", "nonneg_int", "number", "in_range", "input_size", "aa_policy", "positive_float",
           "nonneg_float"]


def _integer(text) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text):
    v = _integer(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def nonneg_int(text):
    v = _integer(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def number(text) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def in_range(low, high, low_open=False, high_open=False):
    """A float flag in [low, high] (an end excluded where open): a value outside fails at parse time, not
    epochs later inside an augmentation or an optimizer."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")

    def parse(text):
        v = number(text)
        if v < low or v > high or (low_open and v == low) or (high_open and v == high):
            raise argparse.ArgumentTypeError(f"must be in {lo}{low:g}, {high:g}{hi}, got {text}")
        return v
    parse.__name__ = f"number in {lo}{low:g}, {high:g}{hi}"
    return parse


def input_size(text):
    from ..models.sizes import MAX_INPUT_SIZE
    v = positive_int(text)
    if v > MAX_INPUT_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_INPUT_SIZE}, got {v}")
    return v


def aa_policy(text):
    from ..data.transforms import check_aa_policy
    try:
        check_aa_policy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def nonneg_float(text):
    v = number(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def seed(text):
    """A seed: an integer torch, numpy and Python all take (rank added), not a 23-digit number that fails later."""
    v = nonneg_int(text)
    if v > 2 ** 32 - 1 - 65536:
        raise argparse.ArgumentTypeError(f"must be at most {2 ** 32 - 1 - 65536} (a seed + the process rank), got {v}")
    return v
