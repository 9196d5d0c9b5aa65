"""This process's settings for a run: compute threads and CPU tuning, determinism, and the seeds."""
import logging
import os
import random

import numpy as np
import torch

from ..runtime.device import DistInfo

__all__ = ["configure_process"]

logger = logging.getLogger("spach.train")


def configure_process(dist: DistInfo, seed: int, deterministic: bool):
    """Threads (one share of the cores per local process), glibc allocator tuning on CPU, deterministic
    algorithms when asked, and the seeds (``seed`` + rank)."""
    device = dist.device
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # one share of the cores per local process (torch alone would give each process all of them). Loader
        # workers get no core of their own: with the cores to itself a 2-core run trains faster with both cores
        # computing (benchmarks/RESULTS.md). On a machine busy with other jobs, OMP_WAIT_POLICY=PASSIVE (or a
        # lower OMP_NUM_THREADS) stops OpenMP's spinning threads from competing with them.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        share = cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, share))
    if device.type == "cpu":
        # glibc keeps freed activation buffers for the next step instead of returning them to the kernel and
        # page-faulting them back in (gain in benchmarks/RESULTS.md; SPACH_CPU_TUNING=0: off)
        from ..runtime.cpu_tuning import apply_cpu_tuning
        tuned = apply_cpu_tuning(threads=torch.get_num_threads())
        logger.info(f"CPU: {torch.get_num_threads()} compute threads, allocator {tuned.get('allocator', 'default')}"
                    + (" (SPACH_CPU_TUNING=0)" if tuned.get("disabled") else ""))
    if deterministic:
        if device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace, read at its first call
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
    seed = seed + dist.rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
