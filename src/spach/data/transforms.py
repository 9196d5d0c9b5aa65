"""DeiT recipe transforms (timm ``create_transform``), safe on current Pillow, and the one evaluation preset.

Evaluation everywhere (``spach train``'s validation, ``spach eval``, ``spach predict``, the fast pipeline) resizes
the short side to ``size / crop_pct`` (bicubic), centre-crops ``size`` and normalises by timm's ImageNet mean /
std, or by what the model's ``pretrained_cfg`` says: :func:`eval_resize_size` and :func:`build_eval_transform`.

timm 1.0.x's RandAugment maps the top posterize magnitude of ``rand-m9-mstd0.5-inc1`` to ``bits=0`` and
Pillow >= 12 refuses ``ImageOps.posterize(img, 0)`` ('bits must be between or equal to 1 and 8'). Older Pillow
turned every pixel black for ``bits=0``; :func:`posterize_safe` keeps that meaning. It is installed on the
posterize ops of the RandAugment instances this module builds, never on timm's global op table.
"""
import math
import re

from PIL import Image, ImageOps
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

__all__ = ["build_transform", "build_eval_transform", "eval_resize_size", "posterize_safe", "patch_posterize",
           "augment_ops"]

_INTERPOLATION = {"bilinear": transforms.InterpolationMode.BILINEAR, "nearest": transforms.InterpolationMode.NEAREST,
                  "bicubic": transforms.InterpolationMode.BICUBIC}


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


_AA_SECTIONS = {"rand": {"m", "n", "mstd", "mmax", "inc", "p"}, "augmix": {"m", "w", "d", "a", "b", "mstd"}}
_AA_POLICIES = ("original", "originalr", "v0", "v0r", "3a")


def check_aa_policy(aa: str) -> None:
    """Raise ``ValueError`` (saying what is known) unless ``aa`` is a timm auto-augment string that builds:
    timm skips sections it does not understand (``rand-m9-xx`` trains without complaint) and asserts on an
    unknown policy only when the first batch is drawn."""
    if aa is None or aa.lower() == "none":
        return
    name, *sections = aa.split("-")
    if name not in _AA_SECTIONS and name not in _AA_POLICIES:
        raise ValueError(f"unknown policy {name!r} in {aa!r}: use rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5, "
                         f"{', '.join(_AA_POLICIES)} (AutoAugment) or none")
    keys = _AA_SECTIONS.get(name, {"mstd"})
    for section in sections:
        if name == "rand" and section.startswith("t") and len(section) > 1:
            continue  # a named op set (rand-t...)
        m = re.fullmatch(r"([a-z]+)(\d+(?:\.\d+)?)", section)
        if not m or m.group(1) not in keys:
            raise ValueError(f"unknown section {section!r} in {aa!r}: {name} takes "
                             f"{', '.join(k + 'N' for k in sorted(keys))}")
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    build = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}.get(name, auto_augment_transform)
    try:
        build(aa, dict(translate_const=100, img_mean=(124, 116, 104)))
    except Exception as e:  # timm asserts
        raise ValueError(f"{aa!r} is not a policy timm can build ({type(e).__name__}: {e})") from None


def eval_resize_size(input_size, crop_pct=None):
    """What the evaluation preset resizes to before the centre crop: ``floor(size / crop_pct)`` (256 for 224 at
    timm's default ``crop_pct`` 0.875); an int for a square ``input_size`` (the short side), else ``(h, w)``."""
    crop_pct = crop_pct or DEFAULT_CROP_PCT
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if h == w:
        return int(math.floor(h / crop_pct))
    return int(math.floor(h / crop_pct)), int(math.floor(w / crop_pct))


def build_eval_transform(input_size, crop_pct=None, interpolation=None, mean=None, std=None):
    """The evaluation preset: resize to :func:`eval_resize_size` (``interpolation``, bicubic by default),
    centre-crop ``input_size`` (an int or ``(h, w)``), to tensor, normalise by ``mean`` / ``std`` (timm's ImageNet
    defaults). ``None`` takes the default, so a model's ``pretrained_cfg.get(...)`` values can be passed as they
    are."""
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    return transforms.Compose([
        transforms.Resize(eval_resize_size(size, crop_pct),
                          interpolation=_INTERPOLATION.get(interpolation, transforms.InterpolationMode.BICUBIC)),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN if mean is None else mean,
                             IMAGENET_DEFAULT_STD if std is None else std),
    ])


def build_transform(is_train: bool, input_size: int, *, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                    aa="rand-m9-mstd0.5-inc1", color_jitter=0.4, train_interpolation="bicubic", reprob=0.25,
                    remode="pixel", recount=1, hflip=0.5, scale=(0.08, 1.0), crop_pct=None):
    """The DeiT transforms: RandAugment + random-resized-crop + flip + random erasing for training; the
    evaluation preset (:func:`build_eval_transform`) otherwise."""
    if is_train:
        from timm.data import create_transform
        tf = create_transform(
            input_size=input_size, is_training=True, color_jitter=color_jitter or None,
            auto_augment=aa if aa and aa.lower() != "none" else None, interpolation=train_interpolation,
            re_prob=reprob, re_mode=remode, re_count=recount, mean=mean, std=std, hflip=hflip, scale=scale)
        if input_size <= 32:
            # as DeiT: at CIFAR-like sizes a padded random crop replaces the random-resized crop
            # (pad_if_needed: a valid image smaller than the crop is padded, not skipped as unreadable)
            tf.transforms[0] = transforms.RandomCrop(input_size, padding=4, pad_if_needed=True)
        patch_posterize(tf)
        return tf
    return build_eval_transform(input_size, crop_pct=crop_pct, mean=mean, std=std)
