"""Devices, mixed precision and distributed setup: the one place that knows about cuda / npu / mps / cpu.

Distributed runs are started by ``torchrun`` (single or multi node), which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; the backend follows the device: nccl for cuda, hccl for
npu, gloo for cpu and mps.
"""
import contextlib
import datetime
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import SpachError

__all__ = ["DistInfo", "available_devices", "resolve_device", "requested_index", "cuda_native_bf16", "init_distributed",
           "destroy_distributed",
           "synchronize", "resolve_amp", "autocast", "all_reduce_sum", "barrier", "broadcast_object",
           "world_size", "cpu_has_native_bf16", "device_count", "default_amp", "max_memory_gib"]

DEVICE_TYPES = ("cuda", "npu", "mps", "cpu")
BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo", "mps": "gloo"}


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        importlib.import_module("torch_npu")
    except Exception:
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


def _device_available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "npu":
        return _npu_available()
    if kind == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return kind == "cpu"


def available_devices():
    return [k for k in DEVICE_TYPES if _device_available(k)]


def device_count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        return torch.npu.device_count()
    return 1


def resolve_device(requested: Optional[str]) -> str:
    """The device type to use: ``requested`` (cuda / npu / cpu / mps, optionally ``cuda:1``) checked to
    exist, or the best available (cuda, npu, mps, cpu)."""
    if not requested:
        return available_devices()[0]
    kind = requested.split(":")[0].lower()
    if kind not in DEVICE_TYPES:
        raise SpachError(f"unknown --device {requested!r}: use one of {', '.join(DEVICE_TYPES)}")
    if not _device_available(kind):
        hint = {"cuda": "no CUDA GPU is visible to PyTorch (check nvidia-smi, CUDA_VISIBLE_DEVICES and that torch "
                        "is a CUDA build)",
                "npu": "torch_npu is not installed or no Ascend NPU is visible (install the torch_npu matching "
                       "your torch and source the CANN set_env.sh)",
                "mps": "Apple MPS is not available on this machine"}[kind]
        raise SpachError(f"--device {kind} requested but {hint}; available here: {', '.join(available_devices())}")
    return kind


@dataclass
class DistInfo:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def requested_index(requested: Optional[str]) -> Optional[int]:
    """The device index of ``--device cuda:1`` / ``npu:3`` (None without one)."""
    if not requested or ":" not in requested:
        return None
    tail = requested.split(":", 1)[1]
    if not tail.isdigit():
        raise SpachError(f"--device {requested!r}: the index after ':' must be a number, e.g. cuda:1")
    return int(tail)


def init_distributed(device_kind: str, timeout_s: int = 1800, index: Optional[int] = None) -> DistInfo:
    """Join the process group when started by torchrun (``WORLD_SIZE > 1``); pick this rank's device: the
    rank's ``LOCAL_RANK``, or ``index`` (``--device cuda:1``) in a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind in ("cuda", "npu"):
        n = device_count(device_kind)
        if world_size > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > n:
            raise SpachError(f"{os.environ.get('LOCAL_WORLD_SIZE')} processes per node but only {n} {device_kind} "
                             f"devices: lower --nproc_per_node to {n}")
        if world_size == 1 and index is not None:
            if index >= n:
                raise SpachError(f"--device {device_kind}:{index} requested but only {n} {device_kind} device(s) "
                                 f"are visible (indices 0-{n - 1})")
        else:
            index = local_rank % max(n, 1)
        getattr(torch, device_kind).set_device(index)
        device = torch.device(device_kind, index)
    else:
        device = torch.device(device_kind)
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        backend = BACKENDS[device_kind]
        kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if device_kind == "cuda":
            kwargs["device_id"] = device  # binds NCCL's communicator to this rank's GPU
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None:
            # torchrun keeps one TCPStore for every restart of the group, and the env:// store adds no per-attempt
            # prefix: the restarted ranks would find the dead attempt's keys (its ranks' gloo addresses) and wait
            # on ports nobody listens on. A fresh key space per attempt.
            from torch.distributed.rendezvous import rendezvous
            store, _, _ = next(rendezvous("env://", timeout=kwargs["timeout"]))
            kwargs.update(store=dist.PrefixStore(f"spach/attempt_{attempt}", store), rank=rank, world_size=world_size)
        try:
            dist.init_process_group(**kwargs)
        except TypeError:  # older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
    return DistInfo(device=device, rank=rank, world_size=world_size, local_rank=local_rank, distributed=distributed)


def destroy_distributed():
    global _HOST_GROUP
    _HOST_GROUP = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the process group (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


_HOST_GROUP = None


def host_group():
    """A gloo process group over the same ranks, for small host-side messages (a stop flag every step) that must
    not wait for the device: on nccl / hccl a collective on a host tensor is not possible, and one on a device
    tensor would synchronise the host with the device. Its own group even when the default one is gloo, so its
    messages never queue behind (or interleave with) DDP's gradient all-reduces. Created once, by every rank (it
    is a collective). None outside torchrun."""
    global _HOST_GROUP
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def synchronize(device: torch.device):
    """Wait for queued device work, so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def max_memory_gib(device: torch.device) -> Optional[float]:
    """The peak memory this process allocated on an accelerator since the start (GiB); None on cpu / mps, where
    the number would be the whole process's and not the model's."""
    backend = {"cuda": getattr(torch, "cuda", None), "npu": getattr(torch, "npu", None)}.get(device.type)
    if backend is None:
        return None
    return backend.max_memory_allocated(device) / 2 ** 30


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matrix products natively (AVX512-BF16 or AMX): there bf16 autocast
    speeds training up (benchmarks/RESULTS.md); elsewhere bf16 is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:
            pass
    return False


def cuda_native_bf16() -> bool:
    """True on GPUs with bf16 tensor cores (Ampere and newer). ``torch.cuda.is_bf16_supported()`` alone also says
    yes where bf16 is only emulated (V100, T4), where fp16 with a grad scaler is the fast mixed precision."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.4: no emulation flag; bf16 tensor cores start at compute capability 8.0
        return torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability()[0] >= 8


def default_amp(device_kind: str) -> str:
    """The default ``--amp`` of ``spach train`` and ``spach benchmark`` on ``device_kind`` (see resolve_amp)."""
    if device_kind == "cuda":
        return "bf16" if cuda_native_bf16() else "fp16"
    if device_kind == "npu":
        supported = getattr(torch.npu, "is_bf16_supported", lambda: False)
        return "bf16" if supported() else "fp16"
    if device_kind == "cpu":
        return "bf16" if cpu_has_native_bf16() else "off"
    return "off"


def resolve_amp(amp: Optional[str], device_kind: str) -> Optional[torch.dtype]:
    """``--amp bf16|fp16|off`` to an autocast dtype (None = fp32).

    Default: bf16 where the device supports it — cuda / npu with bf16, CPUs with native bf16 (AVX512-BF16 /
    AMX) — else fp16 with a grad scaler on cuda / npu, and off (fp32) on other CPUs and on mps. Seeded CPU
    runs stay bit-reproducible under bf16 autocast too (same kernels, same order).
    """
    amp = (amp or default_amp(device_kind)).lower()
    if amp in ("off", "none", "fp32", "no"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device_kind == "cpu":
            raise SpachError("--amp fp16 is not supported on cpu: use --amp bf16 or --amp off")
        return torch.float16
    raise SpachError(f"unknown --amp {amp!r}: use bf16, fp16 or off")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
