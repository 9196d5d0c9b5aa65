"""``--sync-bn``: BatchNorm statistics over the global batch of a DDP run, on every device kind.

Under DDP each rank's BatchNorm normalises with the mean and variance of its own batch (``--batch-size``
samples) and keeps running statistics of those. With ``--sync-bn`` every BatchNorm layer normalises, in
training mode, with the statistics of the whole global batch (all ranks' samples together), so a run on N
processes of B samples computes what one process of N x B samples would, running statistics included, and the
gradients flow through the shared statistics to every rank's inputs.

On cuda / npu this is PyTorch's own :class:`torch.nn.SyncBatchNorm`. PyTorch's refuses CPU tensors, so on the
CPU (gloo) and mps :class:`CpuSyncBatchNorm` does the same with the CPU's BatchNorm kernels: in the forward pass,
per rank, the per-channel count, sum and sum of squares (formed in float64 from the local mean and variance that
BatchNorm's kernel computes), one all-reduce of them, the global mean and (biased) variance to normalise with,
and the running statistics updated as :class:`torch.nn.BatchNorm2d` updates them (unbiased variance,
``momentum`` or the cumulative average, ``num_batches_tracked``); in the backward pass one all-reduce of the
per-channel sums of the output gradient and of its product with the normalised input, which the input gradient
needs over the global batch (the weight and bias gradients stay per rank: DDP averages them). In eval mode both
are plain BatchNorm with the running statistics.

Both keep BatchNorm's parameter and buffer names, so a converted model's ``state_dict`` has the keys (and
values) of the plain one: checkpoints load into models built without ``--sync-bn`` and into the original code.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CpuSyncBatchNorm", "convert_sync_batchnorm", "has_batchnorm", "NATIVE_SYNC_DEVICES", "ONE_PROCESS"]

# the device kinds whose tensors torch.nn.SyncBatchNorm accepts (spach's; PyTorch also takes hpu / xpu)
NATIVE_SYNC_DEVICES = ("cuda", "npu")
# --sync-bn in a run of one process
ONE_PROCESS = ("--sync-bn synchronises BatchNorm across the processes of a torchrun run; this is one process: drop "
               "--sync-bn, or start the run with torchrun --nproc_per_node N")


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm layer (``BatchNorm1d/2d/3d``, or an already synchronised one)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _stats_dtype(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()  # bf16 / fp16 statistics lose too much


class _SyncBatchNormFn(torch.autograd.Function):
    """BatchNorm in training mode with the statistics of every rank's batch: PyTorch's ``sync_batch_norm``
    (its CUDA kernels) written with the CPU's BatchNorm kernels and two all-reduces of per-channel sums, one in
    the forward pass and one in the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        c = x.shape[1]
        n_local = x.numel() // c
        if n_local:
            # the local mean and biased variance by BatchNorm's own kernel (two passes: no cancellation), then
            # the count, the sum and the sum of squares, in float64, where n * (var + mean^2) - n * mean^2 loses
            # nothing that matters
            mean_l, var_l = torch.batch_norm_update_stats(_stats_dtype(x), None, None, 0.0)
            mean_l, var_l = mean_l.double(), var_l.double()
            local = torch.cat([mean_l.new_full((1,), float(n_local)), mean_l * n_local,
                               (var_l + mean_l * mean_l) * n_local])
        else:  # an empty batch on this rank adds nothing (and still takes part in the all-reduce)
            local = torch.zeros(2 * c + 1, dtype=torch.float64, device=x.device)
        total = _all_reduce(local, group)
        n = float(total[0])
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)} "
                             f"on this rank and {n:g} value(s) per channel over all ranks")
        mean = total[1:c + 1] / n
        var = torch.clamp(total[c + 1:] / n - mean * mean, min=0.0)  # biased: what the batch is normalised with
        if running_mean is not None:
            # as BatchNorm: the running variance is the unbiased estimate over the (global) batch
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * (n / (n - 1))).to(running_var.dtype), alpha=momentum)
        stat_dtype = weight.dtype if weight is not None else torch.promote_types(x.dtype, torch.float32)
        mean_p, var_p = mean.to(stat_dtype), var.to(stat_dtype)
        # BatchNorm's own kernel, in eval mode, with the global statistics in place of the running ones
        out = torch.batch_norm(x, weight, bias, mean_p, var_p, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, mean_p, var_p)
        ctx.eps, ctx.group, ctx.n, ctx.mean, ctx.var = eps, group, n, mean, var
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean_p, var_p = ctx.saved_tensors
        c, n = x.shape[1], ctx.n
        w = weight if weight is not None else torch.ones(c, dtype=mean_p.dtype, device=x.device)
        if x.numel():
            # sum(dy) and sum(dy * xhat) over this rank's batch, xhat normalised with the global statistics:
            # the gradients of bias and weight (this rank's share, DDP sums them), by BatchNorm's backward kernel
            _, dw, db = torch.ops.aten.native_batch_norm_backward(dy, x, w, mean_p, var_p, None, None, False,
                                                                  ctx.eps, [False, True, True])
            local = torch.cat([db.double(), dw.double()])
        else:
            dw = db = torch.zeros(c, dtype=w.dtype, device=x.device)
            local = torch.zeros(2 * c, dtype=torch.float64, device=x.device)
        grad_x = None
        if ctx.needs_input_grad[0]:
            total = _all_reduce(local, ctx.group)  # over every rank's samples: the input gradient's reductions
            sum_dy, sum_dy_xhat = total[:c], total[c:]
            invstd = torch.rsqrt(ctx.var + ctx.eps)
            # dx = w * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n) = a * dy + b * x + k, per channel
            a = invstd * w.double()
            b = -a * invstd * sum_dy_xhat / n
            k = -a * sum_dy / n - b * ctx.mean
            compute = torch.promote_types(x.dtype, torch.float32)
            shape = (1, c) + (1,) * (x.dim() - 2)
            grad_x = torch.addcmul(k.to(compute).view(shape), x, b.to(compute).view(shape))
            grad_x = grad_x.addcmul_(dy, a.to(compute).view(shape)).to(x.dtype)
        grad_w = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = db.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


@torch.compiler.disable  # collectives inside: eager, a graph break under --compile
def _sync_batch_norm(x, weight, bias, running_mean, running_var, eps, momentum, group):
    return _SyncBatchNormFn.apply(x, weight, bias, running_mean, running_var, eps, momentum, group)


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of a process group, on any device (PyTorch's :class:`torch.nn.SyncBatchNorm`
    takes accelerator tensors only); same constructor, parameters and buffers. Synchronised in training mode
    when a process group of more than one rank is up; plain BatchNorm otherwise."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self._group()) > 1):
            return super().forward(input)  # eval (running statistics), or nothing to synchronise with
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked.item()) if self.momentum is None else self.momentum
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _sync_batch_norm(input, self.weight, self.bias, *running, self.eps, factor, self._group())


def convert_sync_batchnorm(module: nn.Module, device_type: str, process_group=None) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised over ``process_group`` (default: all ranks):
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` on cuda / npu, :class:`CpuSyncBatchNorm` layers
    elsewhere, sharing the original layers' parameters and buffers. Children are replaced in place; the returned
    module is ``module`` itself unless ``module`` is a BatchNorm layer."""
    if device_type in NATIVE_SYNC_DEVICES:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert_cpu(module, process_group)


def _convert_cpu(module: nn.Module, process_group) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (CpuSyncBatchNorm, nn.SyncBatchNorm)):
        if type(module) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            # a subclass with a forward of its own (e.g. timm's BatchNormAct2d) would lose it
            raise TypeError(f"--sync-bn converts BatchNorm1d/2d/3d layers; {type(module).__name__} is not one")
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        # the same tensors (as torch.nn.SyncBatchNorm.convert_sync_batchnorm shares them)
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child, process_group))
    return out
