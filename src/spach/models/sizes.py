"""Input sizes a model can take, and the sane range of an input size wherever it comes from (a flag, a
checkpoint's stored arguments, a safetensors file's metadata)."""
from typing import Sequence

from ..weights import MAX_INPUT_SIZE  # the bound of flags and stored sizes alike (one home: weights.py)

__all__ = ["MAX_INPUT_SIZE", "input_size_problem"]

def input_size_problem(model, size: Sequence[int], flag: str = "--img-size") -> str:
    """'' when ``model`` takes ``size`` (H, W) inputs, else one sentence naming ``flag``, the model and sizes
    that fit (the multiples of the model's total stride on either side of the size asked for)."""
    stride = int(getattr(model, "total_stride", 1) or 1)
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    for s in size:
        if s % stride:
            below, above = (s // stride) * stride, (s // stride + 1) * stride
            fits = f"{flag} {below} or {above}" if below else f"{flag} {above}"
            return (f"{flag} {s} does not fit {name}: it needs a multiple of its total stride {stride} "
                    f"(e.g. {fits})")
    return ""
