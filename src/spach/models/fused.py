"""The channel MLP ``fc2(act(fc1(x)))`` on the CPU in fp32, shared by the three families.

Every family's channel MLP is two linear layers around GELU (ReLU in one ShiftViT variant) on channels-last
tokens, and in fp32 it is most of a step. Eager PyTorch runs each linear layer as ``addmm``, which first copies
the bias into the whole output and then accumulates the matrix product onto it, and the activation as its own
pass over the hidden tensor, the widest one in the network. Here instead:

- **inference, inside** :func:`packed_weights` (what ``spach eval`` / ``predict`` / ``benchmark --mode infer`` and the
  trainer's validation run under): oneDNN's linear primitive (``torch.ops.mkldnn._linear_pointwise``, the kernel
  Inductor's CPU backend emits) adds the bias and applies the activation in the matrix product's epilogue, on
  weights kept in oneDNN's own blocked layout (reordered once instead of on every call), and a block's residual
  sum can be taken in fc2's epilogue (``residual=``) instead of a pass of its own;
- **training** (where a family measured it as a gain: ShiftViT): one autograd function: the forward products
  take their biases in the epilogue (no bias copy), and the backward writes the activation's gradient over the
  hidden gradient it reads (one hidden-sized buffer fewer to allocate and fill) between the same four matrix
  products autograd would run.

The same math, measured in ``benchmarks/RESULTS.md``, but not the same rounding: oneDNN's products accumulate in
another order than ``addmm`` and its GELU is its own kernel, and whether the last bits differ depends on the CPU
kind (they do on an AMD EPYC with AVX512-BF16 and no AMX: ``docs/TIMM.md``). So inference outside the scope runs
the plain layers: a model's ``model(x)`` computes, bit for bit and on every CPU, what its captured graphs compute
(TorchScript, fx, ``torch.jit.trace``, ``torch.export`` / ONNX and ``torch.compile`` always see the plain layers),
which is what timm's model tests assert of an fx-traced model. The scope is an explicit choice of faster inference,
with a promise from its caller: the weights do not change inside it (a change through the parameter itself is still
seen and repacked; one through ``.data`` is not), and the packed copies are dropped when it ends.

Even inside the scope the path is taken only where it may be: fp32 CPU tensors, a torch built with oneDNN (and
``torch.backends.mkldnn.enabled``), no autocast, no dropout left active, no graph capture and no operator-level
observer (FlopCounterMode). :func:`set_enabled` / :func:`plain_path` switch it off for A/B measurements and tests.
"""
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["capturing", "channel_mlp", "set_enabled", "enabled", "plain_path", "packed_weights"]

_enabled = True
_available: Optional[bool] = None
_pack_available: Optional[bool] = None
# id(module) -> [scopes holding it, {weight slot: ((data_ptr, version, shape), packed, source)}, those of its scopes
# that pack], for the modules of the models inside a packed_weights scope: the only ones fused in inference
_packed: Dict[int, list] = {}


def set_enabled(flag: bool) -> bool:
    """Switch the fused channel MLPs on or off for the whole process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def enabled() -> bool:
    return _enabled


@contextmanager
def plain_path():
    """Run the channel MLPs with their plain layers (PyTorch's ``addmm`` and activation), as a reference."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


@contextmanager
def packed_weights(model: nn.Module, pack: bool = True):
    """Within this scope the channel MLPs of ``model`` run inference on the fused path, with their weights reordered
    once into oneDNN's blocked layout (``pack=False``: reordered on every call, for measuring what packing gains).
    The weights must not change inside it; the packed copies (as large as the MLP weights) are released when it
    ends. Nested and repeated scopes are fine; where oneDNN cannot pack, the fused path runs on plain weights, and
    where the fused path may not run (see the module's notes), the plain layers run."""
    ids = [id(m) for m in model.modules()]
    for i in ids:
        entry = _packed.setdefault(i, [0, {}, 0])
        entry[0] += 1
        entry[2] += bool(pack)
    try:
        yield model
    finally:
        for i in ids:
            entry = _packed.get(i)
            if entry is not None:
                entry[0] -= 1
                entry[2] -= bool(pack)
                if entry[0] <= 0:
                    del _packed[i]


def _pack(module: nn.Module, slot: int, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's layout if ``module`` is inside a packed_weights scope that packs (packed on first use and
    again whenever the parameter was changed in place or replaced), else ``weight`` itself."""
    global _pack_available
    entry = _packed.get(id(module))
    if entry is None or entry[2] <= 0 or _pack_available is False:
        return weight
    # weights made under torch.inference_mode have no version counter: for them only the caller's promise holds
    key = (weight.data_ptr(), None if weight.is_inference() else weight._version, tuple(weight.shape))
    cached = entry[1].get(slot)
    if cached is not None and cached[0] == key:
        return cached[1]
    source = weight.detach()  # kept with the pack: its memory cannot be reused by another tensor meanwhile
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(source)
    except (AttributeError, RuntimeError):
        _pack_available = False  # a torch without the op, or oneDNN refusing the weight: plain weights then
        return weight
    _pack_available = True
    entry[1][slot] = (key, packed, source)
    return packed


def _onednn_linear_available() -> bool:
    global _available
    if _available is None:
        try:
            _available = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        except (AttributeError, RuntimeError):
            _available = False
    return _available and torch.backends.mkldnn.enabled


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


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], attr: str = "none",
            algorithm: str = "") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


class _ChannelMlp(torch.autograd.Function):
    """``fc2(act(fc1(x)))`` with autograd: saves ``x``, the pre-activation (GELU) and the activation, as autograd
    does."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, attr: str, algorithm: str):
        x2 = x.reshape(-1, x.shape[-1])
        pre = _linear(x2, w1, b1)
        if attr == "gelu":
            hidden = torch.nn.functional.gelu(pre, approximate=algorithm)
        else:  # ReLU's gradient needs only its output: computed in place, one hidden tensor kept, as autograd does
            hidden = pre.relu_()
        out = _linear(hidden, w2, b2)
        ctx.save_for_backward(x2, pre, hidden, w1, w2)
        ctx.attr, ctx.algorithm, ctx.x_shape = attr, algorithm, x.shape
        ctx.has_bias = (b1 is not None, b2 is not None)
        return out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x2, pre, hidden, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gw2 = g.t().mm(hidden) if need_w2 else None
        gb2 = g.sum(0) if need_b2 and ctx.has_bias[1] else None
        gh = g.mm(w2)
        if ctx.attr == "gelu":  # the activation's gradient, written over the hidden gradient it reads
            torch.ops.aten.gelu_backward.grad_input(gh, pre, approximate=ctx.algorithm, grad_input=gh)
        else:
            torch.ops.aten.threshold_backward.grad_input(gh, hidden, 0, grad_input=gh)
        gw1 = gh.t().mm(x2) if need_w1 else None
        gb1 = gh.sum(0) if need_b1 and ctx.has_bias[0] else None
        gx = gh.mm(w1).view(ctx.x_shape) if need_x else None
        return gx, gw1, gb1, gw2, gb2, None, None


def channel_mlp(module: nn.Module, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], act: nn.Module,
                w2: torch.Tensor, b2: Optional[torch.Tensor], dropout: float, autograd: bool = False,
                residual: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``module``'s ``F.linear(act(F.linear(x, w1, b1)), w2, b2)`` (its dropouts, of rate ``dropout``, around
    them) on the fused path, or None where it may not run there (then the caller runs its plain layers).
    ``autograd``: whether the training function may run for this module too; it is a family's measured choice
    (a gain for ShiftViT's MLP, a loss for sMLPNet's: ``benchmarks/RESULTS.md``); inference runs fused inside a
    :func:`packed_weights` scope only. ``residual`` (inference only; a tensor of the output's shape): returns
    ``residual + mlp(x)``, the sum taken in fc2's epilogue, or None. Callers reach it from a ``torch.jit.unused``
    method: TorchScript never sees it."""
    if not _enabled or capturing() or _observed():
        return None  # graph capture first: under fx, ``x`` is a proxy with no device to ask
    epilogue = _epilogue(act)
    if (epilogue is None or (module.training and dropout > 0) or x.device.type != "cpu"
            or any(t.dtype != torch.float32 for t in (x, w1, w2)) or torch.is_autocast_enabled("cpu")
            or not _onednn_linear_available()):
        return None
    attr, algorithm = epilogue
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2, residual)):
        # with autograd: the training function, where the family chose it (it takes no residual)
        return _ChannelMlp.apply(x, w1, b1, w2, b2, attr, algorithm) if autograd and residual is None else None
    if id(module) not in _packed:
        return None  # inference outside a packed_weights scope: the plain layers, what a captured graph computes
    if residual is not None and (residual.dtype != torch.float32 or residual.device.type != "cpu"
                                 or not residual.is_contiguous() or residual.shape != (*x.shape[:-1], w2.shape[0])):
        return None
    hidden = _linear(x, _pack(module, 0, w1), b1, attr, algorithm)
    if residual is None:
        return _linear(hidden, _pack(module, 1, w2), b2)
    return torch.ops.mkldnn._linear_pointwise.binary(hidden, residual, _pack(module, 1, w2), b2, "add")
