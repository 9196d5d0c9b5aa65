"""Throughput measurement of the real training step and of inference.

One :class:`Workload` is a built model + optimiser + batch source for one configuration. It runs warm-up steps
(never counted, never timed), then timed blocks of ``steps`` steps each: the clock starts behind a device
synchronise and stops behind another, and the images counted are exactly ``steps * batch_size`` (times
``grad_accum_steps`` in training) per block. The reported rate is the median over blocks.

The training step is the one ``spach train`` runs, :func:`spach.train.engine.train_step`, built from the same
pieces (:func:`~spach.train.optim.build_optimizer`, :func:`~spach.train.losses.build_criterion`,
:func:`~spach.train.engine.build_scaler`): mixup/cutmix on the device with soft targets (label smoothing inside
them) or cross-entropy with label smoothing when mixing is off, autocast with the chosen dtype, a GradScaler for
fp16, AdamW with DeiT's weight-decay groups (fused where the device has the kernel), and no host
synchronisation (no ``.item()``) inside the step.
"""
import contextlib
import itertools
import math
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from ..errors import SpachError
from ..models import fused as fused_mlp
from ..runtime.cpu_tuning import cpu_model_name
from ..runtime.device import autocast, requested_index, resolve_amp, resolve_device, synchronize
from ..train.engine import TrainStep, build_scaler, train_step
from ..train.losses import build_criterion
from ..train.optim import build_optimizer, optimizer_kind

__all__ = ["BenchConfig", "Workload", "run_benchmark", "run_interleaved", "peak_bf16_tflops", "device_name",
           "PeakMemory"]

# Dense bf16 tensor-core peaks in TFLOP/s (fp16 for V100, which has no bf16), without sparsity.
_GPU_PEAKS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H800", 989.4),
              ("GH200", 989.4), ("A100", 312.0), ("A800", 312.0), ("V100", 125.0)]


def peak_bf16_tflops(name: str) -> Optional[float]:
    """Dense bf16 peak of a known GPU (by its CUDA device name), or None."""
    for key, peak in _GPU_PEAKS:
        if key.lower() in name.lower():
            return peak
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_model_name()} ({torch.get_num_threads()} threads)"
    return device.type


@dataclass
class BenchConfig:
    model: str
    mode: str = "train"                 # train | infer
    batch_size: int = 16
    device: str = "cpu"
    amp: str = "off"                    # bf16 | fp16 | off
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    grad_accum_steps: int = 1           # train: micro-batches per optimizer step (a step counts all their images)
    fused_optimizer: bool = True        # the optimizer kernels `spach train` takes (False: foreach AdamW)
    fused_attn: bool = True             # SDPA attention (False: explicit softmax)
    cpu_bf16_explicit_attn: bool = True  # bf16 CPU training takes the explicit softmax (False: SDPA there too)
    fused_mlp: bool = True              # fused channel MLPs, spach.models.fused (False: plain layers)
    packed_weights: bool = True         # inference: the fused MLPs' weights packed once (False: reordered per call)
    data: str = "synthetic"             # synthetic | a folder of JPEGs (ImageFolder, train/ used if present)
    data_pipeline: str = "fast"         # fast | timm | nvjpeg  (only with a data folder)
    workers: int = 2
    steps: int = 5
    warmup: int = 2
    repeats: int = 3
    img_size: int = 224
    num_classes: int = 1000
    drop_path: float = 0.1
    mixup: bool = True                  # DeiT's mixup 0.8 / cutmix 1.0 (soft targets); off: label smoothing
    smoothing: float = 0.1
    lr: float = 5e-4
    weight_decay: float = 0.05
    seed: int = 0
    label: str = ""                     # free-form name of this configuration in reports

    def validate(self):
        if self.mode not in ("train", "infer"):
            raise SpachError(f"unknown --mode {self.mode!r}: use train, infer or both")
        if self.amp not in ("bf16", "fp16", "off"):
            raise SpachError(f"unknown --amp {self.amp!r}: use bf16, fp16 or off")
        if self.batch_size < 1:
            raise SpachError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.steps < 1 or self.repeats < 1 or self.warmup < 0:
            raise SpachError("--steps and --repeats must be at least 1 and --warmup at least 0 "
                             f"(got steps={self.steps}, repeats={self.repeats}, warmup={self.warmup})")
        if self.data_pipeline not in ("fast", "timm", "nvjpeg"):
            raise SpachError(f"unknown --data-pipeline {self.data_pipeline!r}: use fast, timm or nvjpeg")
        if self.data != "synthetic" and not os.path.isdir(self.data):
            raise SpachError(f"--data {self.data!r} is neither 'synthetic' nor an existing folder of images")


class PeakMemory:
    """Peak memory of the measured steps: max allocated bytes on cuda; on cpu the process's peak resident set
    (``VmHWM``), reset before measuring through ``/proc/self/clear_refs`` where Linux allows it (otherwise the
    lifetime peak from ``getrusage``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "max_allocated" if device.type == "cuda" else "peak_rss"
        self.reset_ok = False

    @staticmethod
    def _status_kb(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def current_rss_mb(self) -> Optional[float]:
        kb = self._status_kb("VmRSS")
        return None if kb is None else kb / 1024

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset_ok = True
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        kb = self._status_kb("VmHWM")
        if kb is None:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        return kb / 1024


def _torch_device(name: str) -> torch.device:
    """``--device`` as a torch.device, checked to exist (the same checks and messages as ``spach train``)."""
    kind = resolve_device(name)
    index = requested_index(name)
    return torch.device(kind) if index is None else torch.device(kind, index)


class Workload:
    """A model, its optimiser and a batch source for one :class:`BenchConfig`, ready to time."""

    def __init__(self, cfg: BenchConfig):
        import spach
        cfg.validate()
        self.cfg = cfg
        self.device = _torch_device(cfg.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device.type)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as the trainer: fixed shapes, pick the fastest conv kernels
        torch.manual_seed(cfg.seed)
        try:
            # fused_attn is an option of the attention models only: passed when it asks for the explicit form
            extra = {} if cfg.fused_attn else dict(fused_attn=False)
            model = spach.create_model(cfg.model, num_classes=cfg.num_classes, img_size=cfg.img_size,
                                       drop_path_rate=cfg.drop_path if cfg.mode == "train" else 0.0, **extra)
        except (TypeError, ValueError) as e:
            raise SpachError(f"cannot build {cfg.model} with these settings: {e}") from None
        if not cfg.cpu_bf16_explicit_attn:
            from ..models.layers import SpatialAttention
            for m in model.modules():
                if isinstance(m, SpatialAttention):
                    m.cpu_bf16_explicit_max_tokens = 0
        self.macs_per_image = spach.models.count_flops(model, (cfg.img_size, cfg.img_size))
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.grad_checkpointing:
            if cfg.mode != "train":
                raise SpachError("--grad-checkpointing only applies to --mode train")
            model.set_grad_checkpointing(True)
        self.model = model
        self.net = torch.compile(model) if cfg.compile else model
        self.mixup_fn = None
        self.step_pieces: Optional[TrainStep] = None
        self._scopes = contextlib.ExitStack()
        if cfg.mode == "train":
            model.train()
            self._build_train()
        else:
            model.eval()
            # as spach eval: the fused MLPs' inference scope (fixed weights), packed once or reordered per call
            self._scopes.enter_context(fused_mlp.packed_weights(model, pack=cfg.packed_weights))
        self._build_data()

    # --- training pieces --------------------------------------------------------------------------------
    def _build_train(self):
        cfg = self.cfg
        optimizer = build_optimizer(self.model, self.device, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    fused=None if cfg.fused_optimizer else False)
        self.optimizer_kind = optimizer_kind(optimizer)
        if cfg.mixup and cfg.batch_size % 2 == 0:
            from timm.data import Mixup
            self.mixup_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                                  label_smoothing=cfg.smoothing, num_classes=cfg.num_classes)
        self.step_pieces = TrainStep(
            model=self.model, net=self.net, criterion=build_criterion(self.mixup_fn is not None, cfg.smoothing),
            optimizer=optimizer, device=self.device, amp_dtype=self.amp_dtype,
            scaler=build_scaler(self.device, self.amp_dtype), mixup_fn=self.mixup_fn)

    def train_step(self, x, y):
        accum = self.cfg.grad_accum_steps
        if accum == 1:
            return train_step(self.step_pieces, [(x, y)])
        # the further micro-batches are read when the step asks for them, as in training
        micro = itertools.chain([(x, y)], (self.next_batch() for _ in range(accum - 1)))
        return train_step(self.step_pieces, micro, count=accum)

    def infer_step(self, x, y=None):
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            return self.net(x)

    # --- data -------------------------------------------------------------------------------------------
    def _build_data(self):
        cfg = self.cfg
        self.loader = None
        self.finalize = None
        if cfg.data == "synthetic":
            g = torch.Generator().manual_seed(cfg.seed)
            x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=g)
            y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g)
            x = x.to(self.device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self._synthetic = (x, y.to(self.device))
            return
        from .loaders import build_benchmark_loader
        self.loader, self.finalize = build_benchmark_loader(
            cfg.data, cfg.batch_size, cfg.img_size, cfg.data_pipeline, cfg.workers, self.device,
            train=cfg.mode == "train", seed=cfg.seed)
        self._iter = None

    def next_batch(self):
        if self.loader is None:
            x, y = self._synthetic
            if self.mixup_fn is not None:
                x = x.clone()  # mixup works in place, as it does on a fresh loader batch
            return x, y
        if self._iter is None:
            self._iter = iter(self.loader)
        try:
            batch = next(self._iter)
        except StopIteration:
            self._iter = iter(self.loader)
            batch = next(self._iter)
        x, y = batch[0], batch[1]
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.finalize is not None:
            x = self.finalize(x)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def step(self):
        x, y = self.next_batch()
        previous = fused_mlp.set_enabled(self.cfg.fused_mlp)  # process-wide: set per step for interleaved runs
        try:
            return self.train_step(x, y) if self.cfg.mode == "train" else self.infer_step(x, y)
        finally:
            fused_mlp.set_enabled(previous)

    def warmup(self):
        for _ in range(self.cfg.warmup):
            self.step()
        synchronize(self.device)

    def timed_block(self) -> float:
        """Seconds for ``steps`` steps, device-synchronised at both ends. The process CPU time of the block is
        kept in ``last_cpu_seconds`` (on a CPU shared with other jobs, wall time includes the time slices they
        take; CPU time does not)."""
        synchronize(self.device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(self.cfg.steps):
            self.step()
        synchronize(self.device)
        elapsed = time.perf_counter() - t0
        self.last_cpu_seconds = time.process_time() - c0
        return elapsed

    def flops_per_image(self) -> float:
        """FLOPs (2 per multiply-accumulate) of one image: forward, or 3x forward for a training step."""
        return 2.0 * self.macs_per_image * (3 if self.cfg.mode == "train" else 1)

    def close(self):
        self._scopes.close()
        if self.loader is not None:
            self._iter = None
            self.loader = None


def _result(wl: Workload, times: List[float], mem: PeakMemory, peak_mb: float, base_rss_mb,
            cpu_times: Optional[List[float]] = None) -> Dict:
    cfg = wl.cfg
    per_block = cfg.steps * cfg.batch_size * cfg.grad_accum_steps
    rates = [per_block / t for t in times]
    threads = torch.get_num_threads()
    # images per second of CPU time per thread: the rate the threads would reach with the cores to themselves
    cpu_rates = [per_block * threads / c for c in cpu_times] if cpu_times and wl.device.type == "cpu" else None
    rate = statistics.median(rates)
    step_ms = statistics.median(t / cfg.steps * 1000 for t in times)
    tflops = rate * wl.flops_per_image() / 1e12
    name = device_name(wl.device)
    peak = peak_bf16_tflops(name) if wl.device.type == "cuda" else None
    out = asdict(cfg)
    out.update(
        device_name=name, torch=torch.__version__, threads=torch.get_num_threads(),
        optimizer=getattr(wl, "optimizer_kind", None), images_per_block=per_block,
        images_counted=per_block * len(times), block_seconds=[round(t, 4) for t in times],
        img_per_s=rate, img_per_s_blocks=rates, step_ms=step_ms,
        cpu_seconds=[round(c, 4) for c in cpu_times] if cpu_times else None,
        img_per_cpu_s=statistics.median(cpu_rates) if cpu_rates else None, img_per_cpu_s_blocks=cpu_rates,
        peak_mem_mb=peak_mb, mem_kind=mem.kind, mem_reset=mem.reset_ok, base_rss_mb=base_rss_mb,
        gflops_per_img=wl.flops_per_image() / 1e9, tflops=tflops,
        peak_bf16_tflops=peak, mfu_pct=(100.0 * tflops / peak) if peak else None,
    )
    return out


def run_benchmark(cfg: BenchConfig) -> Dict:
    """Build, warm up, and time ``cfg.repeats`` blocks of ``cfg.steps`` steps; a result dict."""
    cfg.validate()
    mem = PeakMemory(_torch_device(cfg.device))
    base_rss = mem.current_rss_mb()
    wl = Workload(cfg)
    try:
        wl.warmup()  # compilation, first-step allocations (optimizer state) and the allocator settle here
        mem.reset()
        times, cpu_times = [], []
        for _ in range(cfg.repeats):
            times.append(wl.timed_block())
            cpu_times.append(wl.last_cpu_seconds)
        peak = mem.peak_mb()
    finally:
        wl.close()
    return _result(wl, times, mem, peak, base_rss, cpu_times)


def run_interleaved(cfgs: List[BenchConfig], repeats: int) -> List[Dict]:
    """Several configurations in one process, their timed blocks alternating (A B C A B C ...), so that load
    from other processes on a shared machine hits all of them alike; ratios between them are then fair.
    Peak memory is not separable in one process and is left out (``peak_mem_mb`` None)."""
    wls: List[Workload] = []
    try:
        for c in cfgs:
            wls.append(Workload(c))
        for wl in wls:
            wl.warmup()
        times = [[] for _ in wls]
        cpu_times = [[] for _ in wls]
        for _ in range(repeats):
            for i, wl in enumerate(wls):
                times[i].append(wl.timed_block())
                cpu_times[i].append(wl.last_cpu_seconds)
        results = []
        for wl, ts, cs in zip(wls, times, cpu_times):
            mem = PeakMemory(wl.device)
            r = _result(wl, ts, mem, math.nan, None, cs)
            r["peak_mem_mb"] = None
            results.append(r)
    finally:
        for wl in wls:
            wl.close()
    return results
