"""The channel MLPs' inference path on the CPU, shared by the three families.

Every family's channel MLP is ``fc2(act(fc1(x)))`` on channels-last tokens. In fp32 eager inference PyTorch runs
each linear layer as ``addmm``, which first copies the bias into the whole output and then accumulates the matrix
product onto it, and the activation as a separate pass over the hidden tensor, the widest one in the network.
oneDNN's linear primitive (``torch.ops.mkldnn._linear_pointwise``, the kernel Inductor's CPU backend emits) adds
the bias and applies GELU or ReLU in the matrix product's epilogue instead: the same math, two passes over the
hidden tensor fewer (``benchmarks/RESULTS.md``).

The path is taken only where nothing can tell the difference: fp32 CPU tensors, eval mode, no autograd, no
autocast, no graph capture (TorchScript, fx, ``torch.jit.trace``, ``torch.export`` / ONNX and ``torch.compile``
see the plain layers), no operator-level observer (FlopCounterMode), and a torch built with oneDNN. Everywhere else the modules run their plain layers.
:func:`set_enabled` switches it off for A/B measurements and tests.
"""
from contextlib import contextmanager
from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["capturing", "mlp_inference", "set_enabled", "enabled", "plain_path"]

_enabled = True
_available: Optional[bool] = None


def set_enabled(flag: bool) -> bool:
    """Switch the oneDNN inference path on or off for the whole process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def enabled() -> bool:
    return _enabled


@contextmanager
def plain_path():
    """Run the block with the plain layers (PyTorch's ``addmm`` and activation), as a reference."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def _onednn_linear_available() -> bool:
    global _available
    if _available is None:
        try:
            _available = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        except (AttributeError, RuntimeError):
            _available = False
    return _available


@torch.jit.unused
def capturing() -> bool:
    """Tracing or exporting a graph: fx, torch.jit.trace, torch.export / ONNX, torch.compile."""
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing
    return (is_fx_symbolic_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())


def _observed() -> bool:
    """A Python dispatch mode is watching the aten operators (torch's FlopCounterMode, fake tensors ...): it
    sees the plain layers, whose operators it knows."""
    return torch._C._len_torch_dispatch_stack() > 0


def _epilogue(act: nn.Module) -> Optional[Tuple[str, str]]:
    """oneDNN's name for the activation and its algorithm, or None where it has none (then: the plain path)."""
    if type(act) is nn.GELU:
        return "gelu", act.approximate
    if type(act) is nn.ReLU:
        return "relu", ""
    return None


def mlp_inference(module: nn.Module, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                  act: nn.Module, w2: torch.Tensor, b2: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``F.linear(act(F.linear(x, w1, b1)), w2, b2)`` with both biases and the activation in oneDNN's epilogues
    where ``module`` (the MLP, its dropout the identity in eval mode) may take that path; None where it may not
    (then the caller runs its plain layers). Callers reach it from a ``torch.jit.unused`` method: TorchScript
    never sees it."""
    if not _enabled or module.training or torch.is_grad_enabled() or capturing() or _observed():
        return None  # graph capture first: under fx, ``x`` is a proxy with no device to ask
    epilogue = _epilogue(act)
    if (epilogue is None or x.device.type != "cpu" or any(t.dtype != torch.float32 for t in (x, w1, w2))
            or torch.is_autocast_enabled("cpu") or not _onednn_linear_available()):
        return None
    attr, algorithm = epilogue
    hidden = torch.ops.mkldnn._linear_pointwise(x, w1, b1, attr, [], algorithm)
    return torch.ops.mkldnn._linear_pointwise(hidden, w2, b2, "none", [], "")
