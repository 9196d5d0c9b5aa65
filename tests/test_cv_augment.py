"""The fast pipeline's OpenCV kernels: JPEG header and decode give PIL's size and pixels, the array RandAugment
ops give PIL's results (bit-exact for colour / histogram / sharpness ops; the affine ops within rounding and
kernel differences), and timm's sampling of ops and magnitudes is left untouched."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from spach.data import cv_augment as cva
from spach.data.transforms import posterize_safe
from train_helpers import photo


def test_opencv_is_available():
    """opencv-python-headless is a dependency: the fast pipeline's kernels must load."""
    assert cva.available()


def _photo(w, h, seed=0):
    return photo(w, h, seed, noise=10.0)


def _jpeg(img, **kw):
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


pytestmark = pytest.mark.usefixtures("one_thread")  # one thread per worker, as in a loader


def test_jpeg_header_matches_pil():
    for mode, comps in (("RGB", 3), ("L", 1), ("CMYK", 4)):
        for kw in ({}, {"progressive": True}):
            data = _jpeg(Image.new(mode, (37, 19)), **kw)
            assert cva.jpeg_header(data) == (37, 19, comps)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation; the APP1 segment comes before the frame header
    assert cva.jpeg_header(_jpeg(Image.new("RGB", (40, 30)), exif=exif.tobytes())) == (40, 30, 3)
    png = io.BytesIO()
    Image.new("RGB", (5, 5)).save(png, "PNG")
    for not_jpeg in (png.getvalue(), b"", b"\xff\xd8\xff", b"garbage" * 10):
        assert cva.jpeg_header(not_jpeg) is None


def test_decode_equals_pil_at_every_scale():
    img = _photo(500, 375)
    data = _jpeg(img, quality=90)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(cva.decode_jpeg(data), ref)
    for factor in (2, 4, 8):
        pil = Image.open(io.BytesIO(data))
        pil.draft("RGB", (500 // factor, 375 // factor))
        ref = np.asarray(pil.convert("RGB"))
        out = cva.decode_jpeg(data, factor)
        assert out.shape == ref.shape and np.array_equal(out, ref), factor
    # EXIF orientation is ignored, as PIL does
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(img, quality=90, exif=exif.tobytes())
    assert cva.decode_jpeg(data).shape == (375, 500, 3)
    # truncated data: no image (the caller lets PIL raise its error)
    assert cva.decode_jpeg(data[: len(data) // 2]) is None


def _images():
    imgs = [_photo(224, 224, s) for s in range(3)]
    imgs.append(Image.fromarray(np.full((224, 224, 3), 77, np.uint8)))  # flat: histogram ops keep it
    imgs.append(Image.fromarray((np.asarray(imgs[0]) // 64 * 40 + 10).astype(np.uint8)))  # four levels
    return imgs


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing",
                                  "SolarizeAdd", "BrightnessIncreasing", "ContrastIncreasing",
                                  "SharpnessIncreasing"])
def test_array_colour_ops_are_bit_exact(name):
    from timm.data import auto_augment as aa
    pil_fn = posterize_safe if "Posterize" in name else aa.NAME_TO_OP[name]
    level_fn = aa.LEVEL_TO_ARG[name]
    arr_fn = cva.ARRAY_OPS[name]
    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    for magnitude in np.linspace(0, 10, 11):
        for img in _images():
            for seed in (1, 2):  # both signs of the 'increasing' ops
                random.seed(seed)
                args = level_fn(magnitude, hparams) if level_fn else ()
                ref = np.asarray(pil_fn(img, *args))
                out = arr_fn(np.asarray(img).copy(), *args)
                assert out.dtype == np.uint8 and np.array_equal(out, ref), (name, magnitude, args)


def test_affine_ops_match_pil_geometry():
    """Nearest-neighbour results equal PIL's (same geometry: matrix, pixel centres, fill); bilinear and bicubic
    stay within rounding / kernel differences, larger only on the seam where the image meets the fill."""
    from timm.data import auto_augment as aa
    fill = (124, 116, 104)
    nearest, bilinear, bicubic = Image.NEAREST, Image.BILINEAR, Image.BICUBIC
    for img in _images()[:3]:
        for name, level in (("ShearX", 0.23), ("ShearY", -0.17), ("TranslateXRel", 0.31), ("TranslateYRel", -0.2),
                            ("Rotate", 17.3), ("Rotate", -29.0)):
            pil_fn, cv_fn = aa.NAME_TO_OP[name], cva.ARRAY_OPS[name]
            for resample, mean_tol, exact in ((nearest, 0, True), (bilinear, 0.8, False), (bicubic, 1.0, False)):
                ref = np.asarray(pil_fn(img, level, resample=resample, fillcolor=fill)).astype(int)
                out = cv_fn(np.asarray(img).copy(), level, resample=resample, fillcolor=fill).astype(int)
                diff = np.abs(ref - out)
                if exact:
                    # a rotation's sample points can sit on a pixel boundary, where the two round differently
                    assert (diff > 0).mean() < 0.002, (name, resample)
                else:
                    assert diff.mean() < mean_tol and np.percentile(diff, 98) <= 6, (name, resample, diff.mean())
    # a zero angle is PIL's copy, and a random interpolation is drawn per call as timm draws it
    img = _images()[0]
    assert np.array_equal(cva.rotate(np.asarray(img).copy(), 0.0, resample=bicubic), np.asarray(img))
    random.seed(0)
    a = cva.shear_x(np.asarray(img).copy(), 0.2, resample=(bilinear, bicubic), fillcolor=fill)
    random.seed(0)
    b = aa.shear_x(img, 0.2, resample=(bilinear, bicubic), fillcolor=fill)
    assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).mean() < 1.0


def test_array_rand_augment_keeps_timm_sampling():
    """Same seed, same op choices and magnitudes: the array RandAugment's output equals timm's PIL RandAugment
    for draws of colour ops and is close for affine draws."""
    from timm.data.auto_augment import rand_augment_transform
    from spach.data.transforms import patch_posterize
    hp = dict(translate_const=100, img_mean=(124, 116, 104), interpolation=Image.BICUBIC)
    ref_ra = rand_augment_transform("rand-m9-mstd0.5-inc1", hp)
    patch_posterize(ref_ra)
    arr_ra = rand_augment_transform("rand-m9-mstd0.5-inc1", hp)
    # every op of the DeiT policy but Color has an array kernel (Color goes through PIL, as fast there)
    assert cva.use_array_ops(arr_ra) == 14
    img = _images()[1]
    exact = close = 0
    for seed in range(60):
        random.seed(seed), np.random.seed(seed)
        ref = np.asarray(ref_ra(img)).astype(int)
        random.seed(seed), np.random.seed(seed)
        out = arr_ra(np.asarray(img).copy()).astype(int)
        diff = np.abs(ref - out).mean()
        assert diff < 1.5, (seed, diff)
        exact += diff == 0
        close += diff > 0
    assert exact > 20 and close > 5  # both kinds of draws were exercised


def test_array_ops_fall_back_to_pil_for_ops_without_a_kernel():
    from timm.data.auto_augment import rand_augment_transform
    ra = rand_augment_transform("rand-m9-n3-mstd0.5", {"img_mean": (124, 116, 104)})
    for op in ra.ops:
        op.name = op.name + "Unknown" if op.name == "Color" else op.name
    cva.use_array_ops(ra)
    color = [op for op in ra.ops if op.name == "ColorUnknown"][0]
    color.prob = 1.0
    out = color(np.asarray(_images()[0]).copy())
    assert isinstance(out, np.ndarray) and out.shape == (224, 224, 3)


def test_fast_transform_with_and_without_opencv_agree(tmp_path):
    """The whole worker transform, OpenCV path against the PIL path, same seeds: equal when no RandAugment op is
    drawn or a colour op is drawn; close otherwise."""
    from spach.data.fast_pipeline import build_fast_train_transform
    path = tmp_path / "p.jpg"
    _photo(500, 375, seed=4).save(path, quality=90)
    tf_cv, tf_pil = build_fast_train_transform(224), build_fast_train_transform(224, use_cv2=False)
    assert tf_cv.use_cv2 and not tf_pil.use_cv2
    diffs = []
    for seed in range(40):
        random.seed(seed), np.random.seed(seed)
        a = tf_cv(str(path))
        random.seed(seed), np.random.seed(seed)
        b = tf_pil(str(path))
        assert a.shape == b.shape == (3, 224, 224) and a.dtype == b.dtype == torch.uint8
        diffs.append((a.int() - b.int()).abs().float().mean().item())
    assert sum(d == 0 for d in diffs) > 15 and max(diffs) < 1.5, diffs
    # bytes and PIL images as sources, and a grayscale JPEG (the PIL path decodes those)
    assert tf_cv(path.read_bytes()).shape == (3, 224, 224)
    gray = tmp_path / "g.jpg"
    _photo(300, 200).convert("L").save(gray)
    assert tf_cv(str(gray)).shape == (3, 224, 224)


def test_truncated_jpeg_raises_as_with_pil(tmp_path):
    from spach.data.fast_pipeline import build_fast_train_transform
    data = _jpeg(_photo(300, 200), quality=90)
    bad = tmp_path / "t.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError):
        build_fast_train_transform(224)(str(bad))


def test_translation_filter_reproduces_pil():
    """The separable translation equals PIL's transform to within one grey level (PIL's kernels, clamped taps,
    truncation, fill boundary), for whole and fractional shifts of either sign, off the image too."""
    fill = (124, 116, 104)
    for img in _images()[:3] + [_images()[4]]:
        arr = np.asarray(img).copy()
        for pixels in (0.0, 0.3, 0.5, 0.7, -0.3, -0.49, 0.51, -1.5, 12.25, -40.6, 100.5, -100.8, 223.6, -223.4, 250.0):
            for resample, max_frac in ((Image.BICUBIC, 0.03), (Image.BILINEAR, 0.1)):
                for axis in (1, 0):
                    m = (1, 0, pixels, 0, 1, 0) if axis == 1 else (1, 0, 0, 0, 1, pixels)
                    ref = np.asarray(img.transform(img.size, Image.AFFINE, m, resample=resample, fillcolor=fill))
                    out = cva.shift(arr, pixels, axis, resample, fill)
                    diff = np.abs(ref.astype(int) - out.astype(int))
                    assert diff.max() <= 1 and (diff > 0).mean() < max_frac, (pixels, resample, axis)
    assert cva.shift(arr, 3.5, 1, Image.NEAREST, fill) is None  # the caller warps instead
