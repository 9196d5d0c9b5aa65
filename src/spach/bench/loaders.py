"""Data loaders for ``spach benchmark --data DIR``: the trainer's two pipelines over a folder of images, and the
GPU (nvJPEG) decoding path, which only the benchmark runs.

The nvJPEG path: workers read file bytes and draw crop boxes from the JPEG headers (:class:`JpegBytesDataset`);
on the GPU, :class:`GpuJpegDecoder` decodes the batch with ``torchvision.io.decode_jpeg(..., device='cuda')`` and
does crop, resize and flip there. RandAugment is a per-image PIL op set and is not applied on this path.
"""
import io
import os
import random
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..data import cv_augment
from ..data.fast_pipeline import DeviceNormalize, build_fast_eval_transform, build_fast_train_transform, sample_crop
from ..data.folder import load_rgb, scan_images
from ..data.transforms import build_transform
from ..errors import DataError

__all__ = ["build_benchmark_loader", "ImagePathDataset", "JpegBytesDataset", "collate_jpeg_bytes", "GpuJpegDecoder",
           "NvjpegLoader"]


class ImagePathDataset(torch.utils.data.Dataset):
    """``(transform(image), target)`` of ``(path, target)`` samples; with ``pass_path`` the transform gets the
    path itself (the fast pipeline decodes it), else the decoded RGB image."""

    def __init__(self, samples, transform, pass_path: bool):
        self.samples, self.transform, self.pass_path = samples, transform, pass_path

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        return self.transform(path if self.pass_path else load_rgb(path)), target


class JpegBytesDataset(torch.utils.data.Dataset):
    """Worker side of the nvJPEG path: file bytes + a crop box drawn from the header + a flip flag."""

    def __init__(self, samples, size, scale, ratio, hflip):
        self.samples = list(samples)
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        with open(path, "rb") as f:
            data = f.read()
        header = cv_augment.jpeg_header(data)  # pure Python, no OpenCV needed; PIL for anything it does not parse
        width, height = header[:2] if header is not None else Image.open(io.BytesIO(data)).size
        box = sample_crop(width, height, self.scale, self.ratio)
        flip = self.hflip > 0 and random.random() < self.hflip
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor(box + (int(flip),)), target


def collate_jpeg_bytes(batch):
    """``(list of byte tensors, (B, 5) boxes, (B,) targets)``: the bytes differ in length, so they stay a list."""
    return [b[0] for b in batch], torch.stack([b[1] for b in batch]), torch.tensor([b[2] for b in batch])


class GpuJpegDecoder:
    """Device side of the nvJPEG path: batched ``decode_jpeg(device='cuda')``, then per image the crop,
    bicubic antialiased resize and flip on the GPU; returns a uint8 ``(B, 3, H, W)`` batch. RandAugment is a
    per-image PIL op set and is not applied here: use this path for throughput measurement and for recipes
    without RandAugment (``--aa none``); the CPU fast path keeps the full DeiT augmentation."""

    def __init__(self, size=224, device="cuda"):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.device = torch.device(device)

    def __call__(self, datas: Sequence[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg
        images = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=self.device)
        out = torch.empty((len(images), 3) + self.size, dtype=torch.uint8, device=self.device)
        for k, (img, box) in enumerate(zip(images, boxes.tolist())):
            i, j, h, w, flip = box
            crop = img[:, i:i + h, j:j + w].unsqueeze(0).float()
            y = F.interpolate(crop, size=self.size, mode="bicubic", antialias=True, align_corners=False)
            y = y.round_().clamp_(0, 255)
            if flip:
                y = y.flip(-1)
            out[k] = y[0].to(torch.uint8)
        return out


class NvjpegLoader:
    """Iterates a :class:`JpegBytesDataset` loader and yields ``(uint8 batch on the GPU, labels)``."""

    def __init__(self, loader, decoder, device):
        self.loader, self.decoder, self.device = loader, decoder, device

    def __iter__(self):
        for datas, boxes, targets in self.loader:
            yield self.decoder(datas, boxes), targets.to(self.device, non_blocking=True)

    def __len__(self):
        return len(self.loader)


def build_benchmark_loader(root: str, batch_size: int, img_size: int, pipeline: str, workers: int,
                           device: torch.device, train: bool = True, seed: int = 0):
    """A DataLoader over the images under ``root`` and the device-side finishing step (or None), for
    ``spach benchmark --data DIR``. ``pipeline`` 'timm' is the plain per-image PIL transform (float batches);
    'fast' is :mod:`spach.data.fast_pipeline`'s worker transform, as ``spach train --data-pipeline fast`` runs it
    (uint8 batches, normalised and erased on the device); 'nvjpeg' decodes on the GPU (training only, no
    RandAugment)."""
    samples, _ = scan_images(root)
    if not samples:
        base = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
        raise DataError(f"no images under {base}: point --data at an ImageFolder tree (class sub-folders of images) "
                        f"or a folder of JPEGs")
    g = torch.Generator().manual_seed(seed)
    common = dict(batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers, generator=g,
                  persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    if workers > 0:
        common["prefetch_factor"] = 4
    if len(samples) < batch_size:
        samples = (samples * (batch_size // len(samples) + 1))[:max(batch_size, len(samples))]
    if pipeline == "timm":
        tf = build_transform(train, img_size)  # the trainer's own timm/PIL path
        loader = torch.utils.data.DataLoader(ImagePathDataset(samples, tf, pass_path=False), **common)
        return loader, None
    if pipeline == "nvjpeg":
        if device.type != "cuda" or not train:
            raise DataError("--data-pipeline nvjpeg decodes on a CUDA GPU in training: use --device cuda --mode "
                            "train, or --data-pipeline fast")
        not_jpeg = [p for p, _ in samples if not p.lower().endswith((".jpg", ".jpeg"))]
        if not_jpeg:
            raise DataError(f"the GPU (nvJPEG) pipeline decodes JPEG files only, and {len(not_jpeg)} files under "
                            f"{root} are not JPEGs (e.g. {not_jpeg[0]}): use --data-pipeline timm, or a folder of "
                            f"JPEGs")
        decoder = GpuJpegDecoder(img_size, device)
        finalize = DeviceNormalize().to(device)
        loader = torch.utils.data.DataLoader(
            JpegBytesDataset(samples, (img_size, img_size), (0.08, 1.0), (3 / 4, 4 / 3), 0.5),
            collate_fn=collate_jpeg_bytes, **common)
        return NvjpegLoader(loader, decoder, device), finalize
    tf = build_fast_train_transform(img_size) if train else build_fast_eval_transform(img_size)
    finalize = DeviceNormalize(re_prob=0.25 if train else 0.0).to(device)
    loader = torch.utils.data.DataLoader(ImagePathDataset(samples, tf, pass_path=True), **common)
    return loader, finalize
