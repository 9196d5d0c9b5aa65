"""CPU run-time tuning that keeps the math unchanged: malloc thresholds, thread count, bf16 capability.

Why the allocator matters: glibc serves every allocation above ``M_MMAP_THRESHOLD`` (128 KiB, growing
dynamically up to 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``; a training step
allocates and frees the same few hundred activation buffers every iteration, so each step pays a page fault
per 4 KiB page of every large tensor (zeroing included). Raising the mmap and trim thresholds makes glibc keep
the freed memory in its heap and hand it back on the next step. The threshold cannot go above 32 MiB, and at
the default batch of 128 most activations are larger (an XXS model's first-stage activations are ~100 MiB, a
Trans-MS attention matrix several hundred), so :func:`apply_cpu_tuning` also sets ``M_MMAP_MAX`` to 0: every
block then comes from the heap and is reused, at the price of a somewhat larger peak resident set (freed heap
blocks are kept for reuse). Nothing about the arithmetic changes; the gain per step and the memory cost are in
benchmarks/RESULTS.md ("CPU settings").

Use from Python (``spach train`` / ``spach benchmark`` call it at start-up)::

    from spach.runtime.cpu_tuning import apply_cpu_tuning
    report = apply_cpu_tuning(threads=None)      # mallopt + torch threads; returns what it did

A faster allocator than glibc (jemalloc, tcmalloc) preloaded with ``LD_PRELOAD`` is detected and left alone.
The environment variable ``SPACH_CPU_TUNING=0`` switches all of it off (for A/B measurements).
"""
import ctypes
import ctypes.util
import os
import sys
from typing import Dict, Optional

from .device import cpu_has_native_bf16, default_amp

__all__ = ["apply_cpu_tuning", "tune_glibc_malloc", "set_threads", "cpu_has_native_bf16", "default_cpu_amp", "cpu_flags",
           "cpu_model_name"]

# glibc mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

# 1 GiB keeps every activation of a CPU-sized batch in the heap; glibc caps the mmap threshold at
# HEAP_MAX/2 (32 MiB on 64-bit), so larger blocks are still mmapped unless M_MMAP_MAX is 0.
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20
_MMAP_THRESHOLD = 32 << 20

_applied: Dict[str, object] = {}


def _tuning_disabled() -> bool:
    return os.environ.get("SPACH_CPU_TUNING", "1").strip().lower() in ("0", "off", "no", "false")


def tune_glibc_malloc(mmap_threshold: int = _MMAP_THRESHOLD, trim_threshold: int = _TRIM_THRESHOLD,
                      top_pad: int = _TOP_PAD, disable_mmap: bool = False) -> bool:
    """Raise glibc's mmap / trim thresholds in this running process (``mallopt``). Returns False where the
    C library is not glibc (musl, macOS, Windows) or a preloaded allocator replaces malloc."""
    if not sys.platform.startswith("linux"):
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return False  # the preloaded allocator already caches freed memory
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = True
    # setting M_MMAP_THRESHOLD also switches off glibc's dynamic threshold adjustment
    ok &= mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    ok &= mallopt(_M_TOP_PAD, int(top_pad)) == 1
    if disable_mmap:
        ok &= mallopt(_M_MMAP_MAX, 0) == 1
    return bool(ok)


def set_threads(threads: Optional[int]) -> int:
    """Intra-op threads: ``threads`` if given, else the cores this process may run on (not the machine's
    logical CPU count, which oversubscribes under taskset / cgroups). Returns the number set."""
    import torch
    if threads is None or threads <= 0:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:
            threads = os.cpu_count() or 1
    torch.set_num_threads(int(threads))
    return int(threads)


def default_cpu_amp() -> str:
    """The training/benchmark default ``--amp`` on CPU: ``bf16`` on CPUs with native bf16, else ``off``."""
    return default_amp("cpu")


def apply_cpu_tuning(threads: Optional[int] = None, malloc: bool = True) -> Dict[str, object]:
    """Apply the math-preserving CPU settings once per process; returns a dict of what was applied."""
    if _tuning_disabled():
        _applied.update(malloc=False, threads=None, disabled=True)
        return dict(_applied)
    if malloc and "malloc" not in _applied:
        _applied["malloc"] = tune_glibc_malloc(disable_mmap=True)
    _applied["threads"] = set_threads(threads)
    _applied["allocator"] = _preloaded_allocator() or ("glibc-tuned" if _applied.get("malloc") else "default")
    return dict(_applied)


def _preloaded_allocator() -> Optional[str]:
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc"):
        if name in preload:
            return name
    return None


def cpu_model_name() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), for benchmark records."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """Of the CPU flags that decide our kernels (avx2, avx512f, avx512_bf16, amx_bf16), those present, for
    benchmark records."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return " ".join(w for w in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if w in flags) or "none of those"
