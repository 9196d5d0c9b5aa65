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

``spach benchmark`` also runs a GPU (nvJPEG) decoding path of its own: :mod:`spach.bench.loaders`.

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
import random
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from . import cv_augment as _cv
from ..files import open_regular
from .folder import TolerantImageFolder, check_image_shape, to_rgb
from .transforms import eval_resize_size, patch_posterize

__all__ = ["FastTrainTransform", "FastEvalTransform", "build_fast_train_transform", "build_fast_eval_transform",
           "DeviceNormalize", "FastImageFolder", "sample_crop", "build_fast_train_dataset"]


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
    with open_regular(src) as f:  # a FIFO or device named like an image is unreadable, not a hang
        return Image.open(io.BytesIO(f.read()))


def _draft_factor(crop_w: int, crop_h: int, out_w: int, out_h: int) -> int:
    """The largest JPEG DCT scale-down (1, 2, 4, 8) that keeps the crop at least the output size."""
    factor = 1
    for f in (2, 4, 8):
        if crop_w >= f * out_w and crop_h >= f * out_h:
            factor = f
    return factor


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
    with open_regular(src) as f:  # a FIFO or device named like an image is unreadable, not a hang
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
    check_image_shape((width, height))  # from the header: before any decoding
    factor = scale_for(width, height) if is_jpeg else 1
    arr = None
    if img is None:
        arr = _cv.decode_jpeg(data, factor)
        if arr is None:  # OpenCV could not decode it: PIL says why (or manages)
            img = Image.open(io.BytesIO(data))
    if arr is None:
        if factor > 1:
            img.draft("RGB", (width // factor, height // factor))
        arr = np.asarray(to_rgb(img))
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
                 auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1", mean=IMAGENET_DEFAULT_MEAN, draft=True,
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
            patch_posterize(self.rand_augment)  # Pillow >= 12 refuses posterize(bits=0), timm's top magnitude
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

    def __init__(self, input_size=224, crop_pct=None, draft=True, use_cv2=True):
        self.size = int(input_size)
        self.resize = eval_resize_size(self.size, crop_pct)  # the evaluation preset's
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
                               auto_augment="rand-m9-mstd0.5-inc1", mean=IMAGENET_DEFAULT_MEAN, draft=True,
                               color_jitter=None, interpolation="bicubic", use_cv2=True):
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
    """The worker-side half of the evaluation preset (see :class:`FastEvalTransform`); ``crop_pct`` None: timm's
    default."""
    return FastEvalTransform(input_size, crop_pct=crop_pct, draft=draft)


class DeviceNormalize(torch.nn.Module):
    """The device-side half: uint8 ``(B, 3, H, W)`` -> normalised float, then timm's RandomErasing per image
    (probability ``re_prob``, per-pixel normal noise in ``pixel`` mode), on whatever device the batch is on."""

    def __init__(self, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, re_prob=0.25, re_mode="pixel", re_count=1,
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


class FastImageFolder(TolerantImageFolder):
    """:class:`~spach.data.folder.TolerantImageFolder` whose transform receives the file *path* (so it can draw
    the crop from the header and decode DCT-scaled) instead of a decoded image. Items are ``(uint8 tensor, target,
    replaced)``; unreadable files are skipped (or raise with ``strict``) alike."""

    def _read(self, path: str):
        if self.transform is not None:
            return self.transform(path)
        return _hwc_tensor(to_rgb(_open(path)))[0]


def build_fast_train_dataset(samples, classes, input_size=224, *, aa="rand-m9-mstd0.5-inc1", hflip=0.5,
                             scale=(0.08, 1.0), reprob=0.25, remode="pixel", recount=1, mean=IMAGENET_DEFAULT_MEAN,
                             std=IMAGENET_DEFAULT_STD, color_jitter=None, strict=False, interpolation="bicubic"):
    """Both halves of the fast training pipeline from the trainer's flags: ``(dataset, finalize)``. The dataset
    yields ``(uint8 CHW, target, n_replaced)`` like :class:`~spach.data.folder.TolerantImageFolder`; apply
    ``finalize`` (a module; ``.to(device)`` it) to each batch after moving it to the device, before mixup."""
    tf = build_fast_train_transform(input_size, scale=tuple(scale), hflip=hflip, auto_augment=aa, mean=mean,
                                    color_jitter=color_jitter, interpolation=interpolation)
    finalize = DeviceNormalize(mean, std, re_prob=reprob, re_mode=remode, re_count=recount)
    return FastImageFolder(samples, classes, tf, strict=strict), finalize
