"""DeiT recipe transforms (timm ``create_transform``), safe on current Pillow.

timm 1.0.x's RandAugment maps the top posterize magnitude of ``rand-m9-mstd0.5-inc1`` to ``bits=0`` and
Pillow >= 12 refuses ``ImageOps.posterize(img, 0)`` ('bits must be between or equal to 1 and 8'). Older Pillow
turned every pixel black for ``bits=0``; :func:`posterize_safe` keeps that meaning. It is installed on the
posterize ops of the RandAugment instances this module builds, never on timm's global op table.
"""
import math

from PIL import Image, ImageOps
from torchvision import transforms

__all__ = ["build_transform", "posterize_safe", "patch_posterize", "augment_ops", "DEFAULT_MEAN", "DEFAULT_STD"]

DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


def _zero(_value):
    return 0


def posterize_safe(img: Image.Image, bits_to_keep, **_kwargs) -> Image.Image:
    """``ImageOps.posterize`` for every ``bits_to_keep``: >= 8 keeps the image, <= 0 keeps no bit (black)."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits <= 0:
        return img.point(_zero)
    return ImageOps.posterize(img, bits)


def augment_ops(transform):
    """Every op (``AugmentOp``) of the RandAugment / AutoAugment instances inside ``transform`` (a Compose tree)."""
    stack = [transform]
    while stack:
        t = stack.pop()
        children = getattr(t, "transforms", None)
        if children is not None:
            stack.extend(children)
        ops = getattr(t, "ops", None) or []
        policy = getattr(t, "policy", None) or []  # AutoAugment: list of sub-policies (lists of ops)
        yield from list(ops) + [o for sub in policy for o in sub]


def patch_posterize(transform) -> int:
    """Give every posterize op of the RandAugment / AutoAugment instances inside ``transform`` the safe
    posterize (per instance, timm's module is untouched). Returns how many ops were patched."""
    patched = 0
    for op in augment_ops(transform):
        if "posterize" in getattr(op, "name", "").lower():
            op.aug_fn = posterize_safe
            patched += 1
    return patched


def build_transform(is_train: bool, input_size: int, *, mean=DEFAULT_MEAN, std=DEFAULT_STD, aa="rand-m9-mstd0.5-inc1",
                    color_jitter=0.4, train_interpolation="bicubic", reprob=0.25, remode="pixel", recount=1,
                    hflip=0.5, scale=(0.08, 1.0), crop_pct=None):
    """The DeiT transforms: RandAugment + random-resized-crop + flip + random erasing for training; resize to
    ``input_size / crop_pct`` (256 for 224) and centre crop for evaluation."""
    if is_train:
        from timm.data import create_transform
        tf = create_transform(
            input_size=input_size, is_training=True, color_jitter=color_jitter or None,
            auto_augment=aa if aa and aa.lower() != "none" else None, interpolation=train_interpolation,
            re_prob=reprob, re_mode=remode, re_count=recount, mean=mean, std=std, hflip=hflip, scale=scale)
        if input_size <= 32:
            # as DeiT: at CIFAR-like sizes a padded random crop replaces the random-resized crop
            tf.transforms[0] = transforms.RandomCrop(input_size, padding=4)
        patch_posterize(tf)
        return tf
    crop_pct = crop_pct or 224 / 256
    size = int(math.floor(input_size / crop_pct))
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
