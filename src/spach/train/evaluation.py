"""One evaluation pass (top-1 / top-5 and loss, all-reduced over ranks) and the inference throughput measurement."""
import logging
import time

import torch
import torch.nn.functional as F

from ..models.fused import packed_weights
from ..runtime.device import all_reduce_sum, autocast, synchronize
from . import faults
from .engine import _acc_dtype, _batches, _progress

__all__ = ["evaluate", "throughput"]

logger = logging.getLogger("spach.train")


@torch.no_grad()
def evaluate(data_loader, model, device, *, amp_dtype=None, channels_last=False, reduce=True, is_main=True,
             header="", show_progress=False):
    """Top-1 / top-5 accuracy (%) and cross-entropy loss over every sample of ``data_loader``. With
    ``reduce`` the per-rank sums are all-reduced (use with a sharding sampler that neither pads nor repeats,
    so the result equals single-process evaluation)."""
    model.eval()
    acc = _acc_dtype(device)
    sums = torch.zeros(3, device=device, dtype=acc)  # correct1, correct5, loss_sum
    n_seen, n_replaced = 0, 0                         # counted on the host: no device round trip per batch
    bar = _progress(len(data_loader), "Test", show_progress and is_main)
    fault = "eval-ema" if header else "eval"
    with packed_weights(model):  # the weights are fixed while evaluating
        for images, target, n_bad in _batches(data_loader):
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                output = model(images)
            output = output.float()
            loss = F.cross_entropy(output, target, reduction="sum")
            k = min(5, output.shape[1])
            top = output.topk(k, dim=1).indices
            hit = top.eq(target[:, None])
            sums += torch.stack([hit[:, :1].sum(), hit.sum(), loss]).to(acc)
            n_seen += target.numel()
            n_replaced += int(n_bad.sum())
            faults.point(fault)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    sums = torch.cat([sums, torch.tensor([n_seen, n_replaced], dtype=acc, device=device)])
    if reduce:
        all_reduce_sum(sums)
    c1, c5, loss_sum, n, bad = sums.tolist()
    n = max(n, 1.0)
    stats = {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss_sum / n, "n": int(n), "bad_images": int(bad)}
    if is_main:
        logger.info(f"* {header}Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")
        if bad:
            logger.warning(f"{int(bad)} unreadable validation images were replaced by other samples")
    return stats


@torch.no_grad()
def throughput(data_loader, model, device, *, amp_dtype=None, channels_last=False, warmup=10, iters=30):
    """Inference images/s on one batch of ``data_loader`` (after ``warmup`` untimed passes)."""
    model.eval()
    images = next(iter(_batches(data_loader)))[0].to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype), packed_weights(model):
        for _ in range(warmup):
            model(images)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(images)
        synchronize(device)
    dt = time.perf_counter() - t0
    ips = iters * images.shape[0] / dt
    logger.info(f"batch_size {images.shape[0]} throughput {ips:.1f} images/s (averaged over {iters} passes after "
                f"{warmup} warm-up passes)")
    return ips
