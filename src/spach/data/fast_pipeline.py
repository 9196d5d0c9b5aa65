"""A faster DeiT training pipeline with the augmentation distribution of timm's transform.

timm's DeiT transform is ``RandomResizedCrop(bicubic) -> hflip -> RandAugment(rand-m9-mstd0.5-inc1) ->
ToTensor -> Normalize -> RandomErasing(0.25, pixel)``, all per image in the loader workers, on PIL images and
then float tensors. This pipeline draws the same random parameters from the same distributions and applies the
same operations, but:

* the crop box is drawn from the JPEG *header* (no pixels decoded yet), and when the crop is at least twice the
  output size in both directions the JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg
  "draft" mode) so that the decoder never produces pixels the resize would average away;
* with OpenCV (a dependency; PIL is the fallback where ``cv2`` cannot load), JPEGs are decoded by OpenCV's
  libjpeg-turbo into 3-byte pixels (the same pixels as PIL, without PIL's RGBX detour and Python header
  parsing), see :mod:`spach.data.cv_augment`;
* the crop + bicubic antialiased resize runs on the uint8 pixels with PyTorch's vectorised uint8 kernel
  (same Keys a=-0.5 filter with PIL's support scaling; it matches PIL's result to within 1 grey level);
* RandAugment is timm's own instance (op list, choice, magnitudes, probabilities), with the training
  interpolation for its geometric ops as in timm's ``create_transform``; with OpenCV its ops run on HWC arrays:
  the colour, histogram and sharpness ops bit-exact with PIL's, translations within one grey level, shear and
  rotation with ``cv2.warpAffine`` (PIL's geometry and fill; OpenCV's a=-0.75 bicubic against PIL's a=-1);
  without OpenCV they are PIL's;
* workers return uint8 tensors (4x less inter-process traffic than float); normalisation and random erasing
  run batched on the training device (:class:`DeviceNormalize`), as does mixup/cutmix in the trainer.

On a GPU, :class:`GpuJpegDecoder` decodes the JPEG bytes with nvJPEG (``torchvision.io.decode_jpeg(...,
device='cuda')``) and does crop, resize and flip on the device; the workers only read files and draw crop boxes.

Selecting it in a trainer (the plain path stays available)::

    from spach.data.fast_pipeline import build_fast_train_dataset
    dataset_train, finalize = build_fast_train_dataset(
        samples['train'], class_names, args.input_size, aa=args.aa, hflip=args.hflip, scale=args.scale,
        reprob=args.reprob, remode=args.remode, recount=args.recount, color_jitter=args.color_jitter,
        strict=args.strict_data)                          # items: (uint8 CHW, target, n_replaced)
    finalize = finalize.to(device)
    ...  # per batch, after .to(device) and before mixup:  samples = finalize(samples)
"""
import io
import math
import os
import random
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import cv_augment as _cv

__all__ = ["FastTrainTransform", "FastEvalTransform", "build_fast_train_transform", "build_fast_eval_transform",
           "DeviceNormalize", "FastImageFolder", "GpuJpegDecoder", "sample_crop", "build_benchmark_loader",
           "build_fast_train_dataset",
           "DEFAULT_MEAN", "DEFAULT_STD"]

DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


def sample_crop(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-resized crop: the algorithm and random draws of timm's
    ``RandomResizedCropAndInterpolation.get_params`` (10 tries, then a centre crop at the nearest ratio)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = random.uniform(*scale) * area
        aspect_ratio = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= width and h <= height:
            i = random.randint(0, height - h)
            j = random.randint(0, width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _open(src) -> Image.Image:
    """A lazily opened image (header read, pixels not decoded) from a path, bytes or an Image."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(src))
    return Image.open(src)


def _draft_factor(crop_w: int, crop_h: int, out_w: int, out_h: int) -> int:
    """The largest JPEG DCT scale-down (1, 2, 4, 8) that keeps the crop at least the output size."""
    factor = 1
    for f in (2, 4, 8):
        if crop_w >= f * out_w and crop_h >= f * out_h:
            factor = f
    return factor


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)  # transparent pixels become white, as the plain loader
    return img.convert("RGB")


def _hwc_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a ``(1, 3, H, W)`` uint8 tensor with channels-last strides (no channel shuffle)."""
    arr = np.asarray(img)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def _resize_uint8(x: torch.Tensor, size: Tuple[int, int], channels_last: bool = True) -> torch.Tensor:
    """Bicubic (a=-0.5) antialiased resize of a (1, 3, h, w) uint8 tensor, PIL's filter."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    # HWC pixel order, so that the PIL hand-over (RandAugment) and collation copy contiguous rows (the OpenCV
    # path interleaves the planes itself, faster than this copy)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _read_bytes(src):
    """``bytes`` of a path or bytes source (None for an already opened image)."""
    if isinstance(src, Image.Image):
        return None
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    with open(src, "rb") as f:
        return f.read()


def _decode(src, scale_for, use_cv2: bool):
    """Decode ``src`` to an ``(h, w, 3)`` uint8 RGB array, DCT-scaled by ``scale_for(width, height)`` (1, 2, 4 or
    8; asked only for JPEGs). Returns ``(array, width, height)`` with the full-size dimensions."""
    use_cv2 = use_cv2 and _cv.available()
    data = _read_bytes(src) if use_cv2 else None
    header = _cv.jpeg_header(data) if data is not None else None
    img = None
    if header is not None and header[2] == 3:  # a colour JPEG: OpenCV decodes it to PIL's pixels
        width, height = header[0], header[1]
        is_jpeg = True
    else:
        img = _open(src) if data is None else Image.open(io.BytesIO(data))
        width, height = img.size
        is_jpeg = img.format == "JPEG"
    factor = scale_for(width, height) if is_jpeg else 1
    arr = None
    if img is None:
        arr = _cv.decode_jpeg(data, factor)
        if arr is None:  # OpenCV could not decode it: PIL says why (or manages)
            img = Image.open(io.BytesIO(data))
    if arr is None:
        if factor > 1:
            img.draft("RGB", (width // factor, height // factor))
        arr = np.asarray(_to_rgb(img))
    if not arr.flags.writeable:
        arr = arr.copy()
    return arr, width, height


def _decode_crop(src, out_size: Tuple[int, int], box_fn, draft: bool, use_cv2: bool = True) -> torch.Tensor:
    """Open ``src``, draw the crop box from its size, decode (DCT-scaled when the crop allows) and return the
    crop resized to ``out_size`` as a (1, 3, H, W) uint8 tensor (channels-last strides on the PIL path)."""
    out_h, out_w = out_size
    box = []

    def scale_for(width, height):
        box.extend(box_fn(width, height))
        return _draft_factor(box[3], box[2], out_w, out_h) if draft else 1

    arr, width, height = _decode(src, scale_for, use_cv2)
    if not box:  # not a JPEG: the box is drawn from the decoded size
        box.extend(box_fn(width, height))
    i, j, h, w = box
    rh, rw = arr.shape[:2]
    if (rw, rh) != (width, height):
        # the crop box in the reduced image (rounded to whole pixels of the reduced grid)
        sx, sy = width / rw, height / rh
        j0, i0 = int(round(j / sx)), int(round(i / sy))
        w0, h0 = max(1, int(round(w / sx))), max(1, int(round(h / sy)))
        j0, i0 = min(j0, rw - w0), min(i0, rh - h0)
        i, j, h, w = i0, j0, h0, w0
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)[:, :, i:i + h, j:j + w]
    return _resize_uint8(x, (out_h, out_w), channels_last=not (use_cv2 and _cv.available()))


class FastTrainTransform:
    """Path / bytes / PIL image -> ``(3, H, W)`` uint8 tensor: random-resized crop (bicubic), horizontal flip and
    timm's RandAugment. Normalisation and random erasing follow on the device (:class:`DeviceNormalize`)."""

    def __init__(self, input_size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                 auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1", mean=DEFAULT_MEAN, draft=True,
                 interpolation="bicubic", use_cv2=True):
        self.size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.draft = draft
        self.auto_augment = auto_augment
        self.interpolation = interpolation
        self.use_cv2 = bool(use_cv2) and _cv.available()
        self.rand_augment = None
        if auto_augment and auto_augment.lower() != "none":
            from timm.data.auto_augment import rand_augment_transform
            if not auto_augment.startswith("rand"):
                raise ValueError(f"the fast pipeline implements RandAugment ('rand-...'), not {auto_augment!r}")
            hparams = dict(translate_const=int(min(self.size) * 0.45),
                           img_mean=tuple(int(round(255 * m)) for m in mean))
            if interpolation and interpolation != "random":
                # as timm's create_transform: the RandAugment geometric ops use the training interpolation
                # (without it they would draw bilinear or bicubic at random)
                from timm.data.transforms import str_to_pil_interp
                hparams["interpolation"] = str_to_pil_interp(interpolation)
            self.rand_augment = rand_augment_transform(auto_augment, hparams)
            try:  # Pillow >= 12 refuses posterize(bits=0), which timm's top magnitude asks for
                from .transforms import patch_posterize
                patch_posterize(self.rand_augment)
            except ImportError:
                pass
            if self.use_cv2:
                _cv.use_array_ops(self.rand_augment)  # the same ops on HWC arrays (OpenCV / PIL's tables)

    def _box(self, width, height):
        return sample_crop(width, height, self.scale, self.ratio)

    def __call__(self, src) -> torch.Tensor:
        x = _decode_crop(src, self.size, self._box, self.draft, self.use_cv2)
        flip = self.hflip > 0 and random.random() < self.hflip
        if self.use_cv2:
            arr = _cv.to_hwc(x[0])
            if flip:
                arr = _cv.hflip(arr)
            if self.rand_augment is not None:
                arr = self.rand_augment(arr)
            # planar (CHW-contiguous) for the collate: splitting here costs less than a strided stack of HWC views
            return torch.from_numpy(_cv.to_chw(arr))
        if self.rand_augment is not None:
            img = Image.fromarray(x[0].permute(1, 2, 0).numpy())
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            img = self.rand_augment(img)
            x = _hwc_tensor(img)
        elif flip:
            x = x.flip(-1)
        return x[0]

    def __repr__(self):
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
                f"auto_augment={self.auto_augment!r}, draft={self.draft}, interpolation={self.interpolation!r}, "
                f"opencv={self.use_cv2})")


class FastEvalTransform:
    """Path / bytes / PIL image -> ``(3, H, W)`` uint8: resize the short side to ``input_size / crop_pct``
    (bicubic) and centre crop, decoding DCT-scaled where the resize allows."""

    def __init__(self, input_size=224, crop_pct=224 / 256, draft=True, use_cv2=True):
        self.size = int(input_size)
        self.resize = int(math.floor(self.size / crop_pct))
        self.draft = draft
        self.use_cv2 = bool(use_cv2) and _cv.available()

    def _resized(self, width, height):
        s = self.resize / min(width, height)
        return max(1, int(round(width * s))), max(1, int(round(height * s)))

    def __call__(self, src) -> torch.Tensor:
        def scale_for(width, height):
            return _draft_factor(width, height, *self._resized(width, height)) if self.draft else 1

        arr, width, height = _decode(src, scale_for, self.use_cv2)
        rw, rh = self._resized(width, height)
        top, left = int(round((rh - self.size) / 2.0)), int(round((rw - self.size) / 2.0))
        x = _resize_uint8(torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0), (rh, rw))
        return x[0, :, top:top + self.size, left:left + self.size].contiguous()


def build_fast_train_transform(input_size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                               auto_augment="rand-m9-mstd0.5-inc1", mean=DEFAULT_MEAN, draft=True, color_jitter=None,
                               interpolation="bicubic", use_cv2=True):
    """The worker-side half of the fast DeiT training transform (see :class:`FastTrainTransform`).

    ``color_jitter`` is accepted for signature parity with the timm transform, which ignores it when RandAugment
    is on (as here); without RandAugment a colour jitter is not implemented, so that combination is refused."""
    if color_jitter and not (auto_augment and auto_augment.lower() != "none"):
        raise ValueError("the fast pipeline has no colour jitter (timm applies it only without RandAugment): "
                         "use the timm pipeline for this recipe")
    if (input_size if isinstance(input_size, int) else min(input_size)) <= 32:
        raise ValueError("at input sizes <= 32 the recipe uses a padded random crop, which the fast pipeline does "
                         "not implement: use the timm pipeline")
    if interpolation != "bicubic":
        raise ValueError(f"the fast pipeline crops and resizes bicubic, not {interpolation!r}: use "
                         f"--train-interpolation bicubic or the timm pipeline")
    return FastTrainTransform(input_size, scale=scale, ratio=ratio, hflip=hflip, auto_augment=auto_augment,
                              mean=mean, draft=draft, interpolation=interpolation, use_cv2=use_cv2)


def build_fast_eval_transform(input_size=224, crop_pct=None, draft=True):
    return FastEvalTransform(input_size, crop_pct=crop_pct or 224 / 256, draft=draft)


class DeviceNormalize(torch.nn.Module):
    """The device-side half: uint8 ``(B, 3, H, W)`` -> normalised float, then timm's RandomErasing per image
    (probability ``re_prob``, per-pixel normal noise in ``pixel`` mode), on whatever device the batch is on."""

    def __init__(self, mean=DEFAULT_MEAN, std=DEFAULT_STD, re_prob=0.25, re_mode="pixel", re_count=1,
                 dtype=torch.float32):
        super().__init__()
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean255", m, persistent=False)
        self.register_buffer("inv_std255", 1.0 / s, persistent=False)
        self.re_prob = re_prob
        self.re_mode = re_mode
        self.re_count = re_count
        self.dtype = dtype
        self._erasers = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize expects uint8 images, got {x.dtype}")
        mean, inv = self.mean255.to(x.device), self.inv_std255.to(x.device)
        out = x.to(torch.float32).sub_(mean).mul_(inv)  # one float buffer, normalised in place
        if self.re_prob > 0:
            out = self._eraser(x.device)(out)
        return out.to(self.dtype) if self.dtype != torch.float32 else out

    def _eraser(self, device):
        key = str(device)
        if key not in self._erasers:
            from timm.data.random_erasing import RandomErasing
            self._erasers[key] = RandomErasing(probability=self.re_prob, mode=self.re_mode, max_count=self.re_count,
                                               device=key)
        return self._erasers[key]


try:
    from .folder import TolerantImageFolder as _FolderBase
except ImportError:  # the plain data module is not part of this build
    _FolderBase = None


if _FolderBase is not None:
    class FastImageFolder(_FolderBase):
        """:class:`~spach.data.folder.TolerantImageFolder` whose transform receives the file *path* (so it can
        draw the crop from the header and decode DCT-scaled) instead of a decoded image. Items are
        ``(uint8 tensor, target, replaced)``; unreadable files are skipped (or raise with ``strict``) alike."""

        def _read(self, path: str):
            if self.transform is not None:
                return self.transform(path)
            return _hwc_tensor(_to_rgb(_open(path)))[0]


else:  # pragma: no cover
    FastImageFolder = None


def build_fast_train_dataset(samples, classes, input_size=224, *, aa="rand-m9-mstd0.5-inc1", hflip=0.5,
                             scale=(0.08, 1.0), reprob=0.25, remode="pixel", recount=1, mean=DEFAULT_MEAN,
                             std=DEFAULT_STD, color_jitter=None, strict=False, interpolation="bicubic"):
    """Both halves of the fast training pipeline from the trainer's flags: ``(dataset, finalize)``. The dataset
    yields ``(uint8 CHW, target, n_replaced)`` like :class:`~spach.data.folder.TolerantImageFolder`; apply
    ``finalize`` (a module; ``.to(device)`` it) to each batch after moving it to the device, before mixup."""
    if FastImageFolder is None:
        raise ImportError("spach.data.folder is not available in this build")
    tf = build_fast_train_transform(input_size, scale=tuple(scale), hflip=hflip, auto_augment=aa, mean=mean,
                                    color_jitter=color_jitter, interpolation=interpolation)
    finalize = DeviceNormalize(mean, std, re_prob=reprob, re_mode=remode, re_count=recount)
    return FastImageFolder(samples, classes, tf, strict=strict), finalize


class _JpegBytesDataset(torch.utils.data.Dataset):
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
        header = _cv.jpeg_header(data)  # pure Python, no OpenCV needed; PIL for anything it does not parse
        width, height = header[:2] if header is not None else Image.open(io.BytesIO(data)).size
        box = sample_crop(width, height, self.scale, self.ratio)
        flip = self.hflip > 0 and random.random() < self.hflip
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor(box + (int(flip),)), target


def _collate_bytes(batch):
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


def _list_images(root: str):
    """``(samples, classes)`` of an ImageFolder-style tree (``root/train`` if it exists), JPEG/PNG files."""
    from ..errors import DataError
    base = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    exts = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG")
    classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    samples = []
    if classes:
        for ci, c in enumerate(classes):
            for dirpath, _, files in os.walk(os.path.join(base, c)):
                samples += [(os.path.join(dirpath, f), ci) for f in sorted(files) if f.endswith(exts)]
    else:
        samples = [(os.path.join(base, f), 0) for f in sorted(os.listdir(base)) if f.endswith(exts)]
        classes = ["images"]
    if not samples:
        raise DataError(f"no .jpg/.jpeg/.png images under {base}: point --data at an ImageFolder tree "
                        f"(class sub-folders of images) or a folder of JPEGs")
    return samples, classes


class _PlainFolder(torch.utils.data.Dataset):
    def __init__(self, samples, transform, pass_path):
        self.samples, self.transform, self.pass_path = samples, transform, pass_path

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        if self.pass_path:
            return self.transform(path), target
        with open(path, "rb") as f:
            img = Image.open(f)
            img = _to_rgb(img)
            img.load()
        return self.transform(img), target


def build_benchmark_loader(root: str, batch_size: int, img_size: int, pipeline: str, workers: int,
                           device: torch.device, train: bool = True, seed: int = 0):
    """A DataLoader over the images under ``root`` and the device-side finishing step (or None), for
    ``spach benchmark --data DIR``. ``pipeline`` 'timm' is the plain per-image PIL transform (float batches);
    'fast' is this module's worker transform, as ``spach train --data-pipeline fast`` runs it (uint8 batches,
    normalised and erased on the device); 'nvjpeg' decodes on the GPU (training only, no RandAugment)."""
    samples, _ = _list_images(root)
    g = torch.Generator().manual_seed(seed)
    common = dict(batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers, generator=g,
                  persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    if workers > 0:
        common["prefetch_factor"] = 4
    if len(samples) < batch_size:
        samples = (samples * (batch_size // len(samples) + 1))[:max(batch_size, len(samples))]
    if pipeline == "timm":
        from .transforms import build_transform  # the trainer's own timm/PIL path
        tf = build_transform(train, img_size)
        loader = torch.utils.data.DataLoader(_PlainFolder(samples, tf, pass_path=False), **common)
        return loader, None
    if pipeline == "nvjpeg":
        from ..errors import DataError
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
            _JpegBytesDataset(samples, (img_size, img_size), (0.08, 1.0), (3 / 4, 4 / 3), 0.5),
            collate_fn=_collate_bytes, **common)
        return _NvjpegLoader(loader, decoder, device), finalize
    tf = build_fast_train_transform(img_size) if train else build_fast_eval_transform(img_size)
    finalize = DeviceNormalize(re_prob=0.25 if train else 0.0).to(device)
    loader = torch.utils.data.DataLoader(_PlainFolder(samples, tf, pass_path=True), **common)
    return loader, finalize


class _NvjpegLoader:
    """Iterates a bytes loader and yields ``(uint8 batch on the GPU, labels)``."""

    def __init__(self, loader, decoder, device):
        self.loader, self.decoder, self.device = loader, decoder, device

    def __iter__(self):
        for datas, boxes, targets in self.loader:
            yield self.decoder(datas, boxes), targets.to(self.device, non_blocking=True)

    def __len__(self):
        return len(self.loader)
