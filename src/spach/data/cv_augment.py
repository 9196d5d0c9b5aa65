"""OpenCV kernels for the fast pipeline: JPEG decoding and the expensive RandAugment ops.

``opencv-python-headless`` is a dependency of spach; where ``cv2`` cannot be imported all the same (a broken
install), the fast pipeline keeps PIL for these steps (:func:`available` says which).

* :func:`decode_jpeg` decodes with OpenCV's libjpeg-turbo straight into a 3-byte-per-pixel array (PIL decodes into
  4-byte RGBX pixels and then needs a copy), optionally DCT-scaled by 2, 4 or 8 like PIL's ``draft``. The pixels are
  PIL's: same library, same default IDCT and upsampling; EXIF orientation is ignored, as PIL does.
* :func:`use_array_ops` makes a timm RandAugment run on (H, W, 3) uint8 arrays. The op choice, magnitudes,
  probabilities and the interpolation draw stay timm's own code; only the pixel kernels change:

  - colour and histogram ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Brightness,
    Contrast): PIL's look-up tables, applied with ``cv2.LUT``; bit-exact. Color goes through PIL (as fast there).
  - Sharpness: PIL's SMOOTH filter (3x3, centre 5, /13, borders kept) and PIL's float32 blend with truncation;
    bit-exact, and faster (per-op timings: ``benchmarks/RESULTS.md``).
  - translations: a separable 4-tap filter with PIL's own bicubic (a=-1) or bilinear weights, clamped taps,
    truncation and fill (:func:`shift`): within one grey level of PIL (off by one on 0.1-2% of the pixels).
  - shear and rotation: ``cv2.warpAffine`` with PIL's matrix (PIL samples at pixel centres, hence the half-pixel
    shifts) and PIL's fill colour. Nearest-neighbour results equal PIL's; bilinear and bicubic differ by rounding
    (PIL truncates) and, for bicubic, by the kernel (OpenCV's Keys a=-0.75 against PIL's a=-1): on average
    0.5-0.7 grey levels, more only along the one-pixel seam where the image meets the fill. Faster than PIL's
    generic transform (``benchmarks/RESULTS.md``).
"""
import math
import random

import numpy as np
from PIL import Image

try:  # pragma: no cover - exercised where OpenCV is installed
    import cv2
except Exception:  # ImportError, or a broken OpenCV install (missing system libraries)
    cv2 = None

__all__ = ["available", "jpeg_header", "decode_jpeg", "use_array_ops", "warp", "affine", "shift", "sharpen",
           "to_hwc", "to_chw", "hflip", "ARRAY_OPS"]

_threads_set = False


def available() -> bool:
    return cv2 is not None


def _single_thread():
    """One OpenCV thread per process: each loader worker is one core, as for the PIL path."""
    global _threads_set
    if not _threads_set:
        cv2.setNumThreads(1)
        _threads_set = True


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)


def jpeg_header(data):
    """``(width, height, components)`` from a JPEG's start-of-frame segment, without decoding anything (PIL's
    ``Image.open`` parses every table in Python, which costs more than this whole scan). None if ``data`` is not
    a JPEG this parser understands; the caller then opens it with PIL."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # stand-alone markers
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF:
            if pos + 10 > n or length < 8:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            comps = data[pos + 9]
            return (width, height, comps) if width and height else None
        if marker in (0xD9, 0xDA):  # end of image / start of scan before a frame header
            return None
        pos += 2 + length
    return None


_REDUCED = {1: None, 2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4", 8: "IMREAD_REDUCED_COLOR_8"}


def decode_jpeg(data, factor: int = 1):
    """JPEG bytes -> ``(H, W, 3)`` uint8 RGB array, DCT-scaled by ``factor`` (1, 2, 4 or 8). None if OpenCV
    could not decode the data (the caller falls back to PIL, which gives the user-facing error)."""
    _single_thread()
    buf = np.frombuffer(data, np.uint8)
    ignore = getattr(cv2, "IMREAD_IGNORE_ORIENTATION", 128)
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
    if factor == 1 and rgb_flag is not None:
        return cv2.imdecode(buf, rgb_flag | ignore)
    flag = cv2.IMREAD_COLOR if factor == 1 else getattr(cv2, _REDUCED[factor])
    out = cv2.imdecode(buf, flag | ignore)
    if out is None:
        return None
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


_INTERP = {}
if cv2 is not None:
    _INTERP = {int(Image.Resampling.NEAREST if hasattr(Image, "Resampling") else Image.NEAREST): cv2.INTER_NEAREST,
               int(Image.Resampling.BILINEAR if hasattr(Image, "Resampling") else Image.BILINEAR): cv2.INTER_LINEAR,
               int(Image.Resampling.BICUBIC if hasattr(Image, "Resampling") else Image.BICUBIC): cv2.INTER_CUBIC}


def _pick_resample(kwargs):
    """timm's ``_interpolation``: a tuple means one random choice per call (same RNG draw as timm)."""
    resample = kwargs.get("resample", Image.BICUBIC)
    if isinstance(resample, (list, tuple)):
        resample = random.choice(resample)
    return resample


def _fill(fillcolor, channels):
    if fillcolor is None:
        return (0,) * channels
    if isinstance(fillcolor, (int, float)):
        return (int(fillcolor),) * channels
    return tuple(int(v) for v in fillcolor)[:channels]


def warp(arr, matrix, resample=Image.BICUBIC, fillcolor=None):
    """PIL's ``Image.transform(size, Image.AFFINE, matrix, resample, fillcolor=...)`` on an (H, W[, C]) uint8
    array with ``cv2.warpAffine``."""
    _single_thread()
    a0, a1, a2, a3, a4, a5 = (float(v) for v in matrix)
    # PIL maps output pixel centres (x + 0.5, y + 0.5) and samples the input at pixel centres (minus 0.5)
    m = np.array([[a0, a1, 0.5 * (a0 + a1) + a2 - 0.5],
                  [a3, a4, 0.5 * (a3 + a4) + a5 - 0.5]], dtype=np.float64)
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    return cv2.warpAffine(arr, m, (arr.shape[1], arr.shape[0]), flags=_INTERP[int(resample)] | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=_fill(fillcolor, channels))


def affine(arr, matrix, resample=Image.BICUBIC, fillcolor=None):
    """``transform(size, Image.AFFINE, matrix, resample=resample, fillcolor=fillcolor)`` of an (H, W, C) uint8
    array: OpenCV for nearest / bilinear / bicubic, PIL for any other resampling filter."""
    if int(resample) in _INTERP:
        return warp(arr, matrix, resample, fillcolor)
    img = Image.fromarray(arr)
    return np.asarray(img.transform(img.size, Image.AFFINE, tuple(matrix), resample=resample, fillcolor=fillcolor))


def _rotation_matrix(width, height, degrees):
    """PIL's ``Image.rotate`` matrix (about the centre, no expansion)."""
    angle = -math.radians(degrees)
    m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
         round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    cx, cy = width / 2.0, height / 2.0
    m[2] = m[0] * -cx + m[1] * -cy + cx
    m[5] = m[3] * -cx + m[4] * -cy + cy
    return m


def rotate(arr, degrees, **kwargs):
    resample = _pick_resample(kwargs)
    fill = kwargs.get("fillcolor")
    angle = degrees % 360.0
    if angle == 0:
        return arr.copy()
    if angle in (90.0, 180.0, 270.0):  # PIL takes exact transposes for these
        return np.asarray(Image.fromarray(arr).rotate(degrees, resample=resample, fillcolor=fill))
    return affine(arr, _rotation_matrix(arr.shape[1], arr.shape[0], degrees), resample, fill)


def shear_x(arr, factor, **kwargs):
    return affine(arr, (1, factor, 0, 0, 1, 0), _pick_resample(kwargs), kwargs.get("fillcolor"))


def shear_y(arr, factor, **kwargs):
    return affine(arr, (1, 0, 0, factor, 1, 0), _pick_resample(kwargs), kwargs.get("fillcolor"))


def _pil_cubic_weights(d):
    """PIL's bicubic (a=-1) weights for the taps at -1, 0, 1, 2 around a sample at fraction ``d``."""
    d2, d3 = d * d, d * d * d
    return np.array([-d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, -d2 + d3], dtype=np.float32)


def shift(arr, pixels, axis, resample=Image.BICUBIC, fillcolor=None):
    """PIL's translation ``transform(AFFINE, (1, 0, p, 0, 1, 0))`` (axis 1) or ``(1, 0, 0, 0, 1, p)`` (axis 0) of
    an (H, W, C) uint8 array as a separable filter: one fraction for the whole image, so a 4-tap (bicubic) or
    2-tap (bilinear) filter with PIL's clamped taps, a whole-pixel shift and PIL's fill where the sample point
    leaves the image. With PIL's own kernels (bicubic a=-1) and truncation it reproduces PIL to within one grey
    level (off by one on 0.1-2% of the pixels for bicubic, up to 6% for bilinear: OpenCV's 8-bit filter rounds
    its sums a little differently from PIL's double arithmetic) at under half of ``warpAffine``'s cost. Returns
    None for other interpolations."""
    n = math.floor(pixels)
    d = pixels - n
    if resample == Image.BICUBIC:
        k, anchor = _pil_cubic_weights(d), 1
    elif resample == Image.BILINEAR:
        k, anchor = np.array([1 - d, d], dtype=np.float32), 0
    else:
        return None
    _single_thread()
    size = arr.shape[axis]
    # one replicated pixel before and after: filtered[c + 1] is the interpolated value at source position c + d
    # for c in -1 .. size, with the taps clamped to the image as PIL clamps them
    padded = cv2.copyMakeBorder(arr, *((0, 0, 1, 1) if axis == 1 else (1, 1, 0, 0)), cv2.BORDER_REPLICATE)
    kernel = k.reshape(1, -1) if axis == 1 else k.reshape(-1, 1)
    # 8-bit output rounds: shifting by -0.5 makes that PIL's truncation (the +5e-4 keeps whole values whole, as
    # PIL's double arithmetic does)
    filtered = cv2.filter2D(padded, cv2.CV_8U, kernel, anchor=(anchor, 0) if axis == 1 else (0, anchor),
                            delta=-0.4995, borderType=cv2.BORDER_REPLICATE)
    out = np.empty_like(arr)
    out[...] = np.asarray(_fill(fillcolor, arr.shape[2]), dtype=np.uint8)
    # output x samples source x + pixels; PIL fills where that point (a pixel centre) leaves [0, size)
    lo = max(0, math.ceil(-pixels - 0.5))
    hi = min(size, math.ceil(size - pixels - 0.5))
    if hi > lo:
        src = slice(lo + n + 1, hi + n + 1)
        if axis == 1:
            out[:, lo:hi] = filtered[:, src]
        else:
            out[lo:hi] = filtered[src]
    return out


def _translate(arr, pixels, axis, kwargs):
    resample = _pick_resample(kwargs)
    fill = kwargs.get("fillcolor")
    out = shift(arr, pixels, axis, resample, fill)
    if out is not None:
        return out
    return affine(arr, (1, 0, pixels, 0, 1, 0) if axis == 1 else (1, 0, 0, 0, 1, pixels), resample, fill)


def translate_x_rel(arr, pct, **kwargs):
    return _translate(arr, pct * arr.shape[1], 1, kwargs)


def translate_y_rel(arr, pct, **kwargs):
    return _translate(arr, pct * arr.shape[0], 0, kwargs)


def translate_x_abs(arr, pixels, **kwargs):
    return _translate(arr, pixels, 1, kwargs)


def translate_y_abs(arr, pixels, **kwargs):
    return _translate(arr, pixels, 0, kwargs)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0


def sharpen(arr, factor):
    """``ImageEnhance.Sharpness(...).enhance(factor)`` on an (H, W[, C]) uint8 array, bit-exact."""
    _single_thread()
    if factor == 1.0:
        return arr.copy()
    smooth = cv2.filter2D(arr, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
    # PIL's 3x3 filter leaves the outermost rows and columns as they were
    smooth[0], smooth[-1] = arr[0], arr[-1]
    smooth[:, 0], smooth[:, -1] = arr[:, 0], arr[:, -1]
    # Image.blend(smooth, img, factor): float32 smooth + alpha * (img - smooth), truncated, clipped to 0..255
    s = smooth.astype(np.float32)
    out = arr.astype(np.float32)
    out -= s
    out *= np.float32(factor)
    out += s
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)


def to_hwc(x):
    """A (3, H, W) uint8 tensor as a contiguous (H, W, 3) array (no copy when it already has that layout)."""
    hwc = x.permute(1, 2, 0)
    if hwc.is_contiguous():
        return hwc.numpy()
    if x.is_contiguous():  # planar: OpenCV interleaves three planes much faster than a strided copy
        return cv2.merge([x[0].numpy(), x[1].numpy(), x[2].numpy()])
    return np.ascontiguousarray(hwc.numpy())


def to_chw(a):
    """An (H, W, 3) uint8 array as a new contiguous (3, H, W) array."""
    return np.stack(cv2.split(a))


def hflip(a):
    return cv2.flip(a, 1)


# ---- RandAugment on HWC uint8 arrays ------------------------------------------------------------------------------
# The same ops as above and as timm's PIL ops, taking and returning (H, W, 3) uint8 arrays, so that a RandAugment
# runs without PIL images in between. Colour and histogram ops are PIL's look-up tables (bit-exact), applied with
# cv2.LUT; ops without an array kernel here go through PIL (exact by construction).

def _lut3(a, lut):
    """Apply a (256,) or per-channel (3, 256) uint8 table."""
    lut = np.asarray(lut, dtype=np.uint8)
    if lut.ndim == 2:
        if (lut == lut[0]).all():
            return cv2.LUT(a, np.ascontiguousarray(lut[0]))
        # per plane: OpenCV's 3-channel table lookup is slower than split + three 1-channel lookups + merge
        return cv2.merge([cv2.LUT(p, np.ascontiguousarray(t)) for p, t in zip(cv2.split(a), lut)])
    return cv2.LUT(a, lut)


def _blend_lut(degenerate, factor):
    """PIL's ``Image.blend(degenerate, image, factor)`` for a constant degenerate value, as a table over the image
    value: float32 ``degenerate + factor * (v - degenerate)``, truncated, clipped to 0..255."""
    v = np.arange(256, dtype=np.float32)
    d = np.float32(degenerate)
    out = d + np.float32(factor) * (v - d)
    return np.clip(out, 0.0, 255.0).astype(np.uint8)


def _histograms(a):
    """(3, 256) per-channel histograms."""
    return np.stack([cv2.calcHist([a], [c], None, [256], [0, 256]).ravel() for c in range(3)]).astype(np.int64)


def a_auto_contrast(a, **_kwargs):
    """``ImageOps.autocontrast`` (no cutoff)."""
    lut = np.empty((3, 256), np.uint8)
    ix = np.arange(256, dtype=np.float64)
    for c, plane in enumerate(cv2.split(a)):  # (cv2.minMaxLoc per plane: numpy's per-column min / max is slower)
        lo, hi = (int(v) for v in cv2.minMaxLoc(plane)[:2])
        if hi <= lo:
            lut[c] = np.arange(256)
        else:
            scale = 255.0 / (hi - lo)
            offset = -lo * scale
            lut[c] = np.clip((ix * scale + offset).astype(np.int64), 0, 255)  # int() truncates toward zero
    return _lut3(a, lut)


def a_equalize(a, **_kwargs):
    """``ImageOps.equalize``."""
    h = _histograms(a)
    lut = np.empty((3, 256), np.int64)
    for c in range(3):
        nz = h[c][h[c] > 0]
        step = (int(nz.sum()) - int(nz[-1])) // 255 if len(nz) > 1 else 0
        if not step:
            lut[c] = np.arange(256)
        else:
            n = step // 2 + np.concatenate(([0], np.cumsum(h[c])[:-1]))
            lut[c] = n // step
    return _lut3(a, np.clip(lut, 0, 255))


def a_invert(a, **_kwargs):
    return cv2.bitwise_not(a)


def a_posterize(a, bits_to_keep, **_kwargs):
    """``ImageOps.posterize``; bits >= 8 keeps the image and bits <= 0 keeps no bit (black), as
    :func:`spach.data.transforms.posterize_safe`."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return a
    if bits <= 0:
        return np.zeros_like(a)
    return np.bitwise_and(a, np.uint8((0xFF << (8 - bits)) & 0xFF))


def a_solarize(a, thresh, **_kwargs):
    i = np.arange(256)
    return _lut3(a, np.where(i < thresh, i, 255 - i))


def a_solarize_add(a, add, thresh=128, **_kwargs):
    i = np.arange(256)
    return _lut3(a, np.where(i < thresh, np.minimum(255, i + add), i))


def a_brightness(a, factor, **_kwargs):
    return _lut3(a, _blend_lut(0, factor))


def a_contrast(a, factor, **_kwargs):
    # PIL's statistic: the rounded mean of the image converted to L (PIL's fixed-point luma)
    hist = Image.fromarray(a).convert("L").histogram()
    mean = int(np.dot(np.arange(256), hist) / a.shape[0] / a.shape[1] + 0.5)
    return _lut3(a, _blend_lut(mean, factor))


def a_sharpness(a, factor, **_kwargs):
    return sharpen(a, factor)


def _via_pil(pil_fn):
    """An array op from a PIL op (exact by construction): array -> PIL -> op -> array."""
    def fn(a, *args, **kwargs):
        return np.asarray(pil_fn(Image.fromarray(a), *args, **kwargs))
    fn.__name__ = "a_" + getattr(pil_fn, "__name__", "op")
    fn.pil_fn = pil_fn
    return fn


# the array kernel of each timm RandAugment op (timm's ``NAME_TO_OP`` names); ops not listed go through PIL
ARRAY_OPS = {
    "AutoContrast": a_auto_contrast,
    "Equalize": a_equalize,
    "Invert": a_invert,
    "Posterize": a_posterize,
    "PosterizeIncreasing": a_posterize,
    "PosterizeOriginal": a_posterize,
    "Solarize": a_solarize,
    "SolarizeIncreasing": a_solarize,
    "SolarizeAdd": a_solarize_add,
    "Brightness": a_brightness,
    "BrightnessIncreasing": a_brightness,
    "Contrast": a_contrast,
    "ContrastIncreasing": a_contrast,
    "Sharpness": a_sharpness,
    "SharpnessIncreasing": a_sharpness,
    "Rotate": rotate,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
    "TranslateX": translate_x_abs,
    "TranslateY": translate_y_abs,
}


def use_array_ops(transform) -> int:
    """Make every op of the RandAugment / AutoAugment instances inside ``transform`` take and return (H, W, 3)
    uint8 RGB arrays (per instance; timm's op table is untouched): OpenCV / look-up-table kernels where this
    module has one, PIL in between otherwise. timm's sampling (op choice, probabilities, magnitudes,
    interpolation draw) is untouched. Returns how many ops got an array kernel. Requires OpenCV."""
    if cv2 is None:
        raise RuntimeError("array RandAugment ops need OpenCV (pip install opencv-python-headless)")
    from .transforms import augment_ops
    native = 0
    for op in augment_ops(transform):
        fn = ARRAY_OPS.get(getattr(op, "name", ""))
        if fn is not None:
            op.aug_fn = fn
            native += 1
        else:
            op.aug_fn = _via_pil(op.aug_fn)
    return native
