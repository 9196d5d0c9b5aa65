"""Data: dataset checks, bad and odd images, the RandAugment posterize fix, samplers, the demo dataset."""
import os
import random
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from spach.data import (EvalShardSampler, RASampler, ShuffleSampler, TolerantImageFolder, build_transform,
                        check_dataset, load_rgb)
from spach.errors import DataError
from train_helpers import draw_shape, fast_flags, jpeg_bytes, make_shapes_folder, run_spach


@pytest.fixture
def shapes(tmp_path):
    return make_shapes_folder(tmp_path / "shapes", n_train=8, n_val=4)


# ---- dataset checks: one clear error naming the path and the fix

def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError, match=r"does not exist: pass --data-path DIR"):
        check_dataset(str(tmp_path / "nope"))


def test_dataset_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        check_dataset(str(tmp_path / "f"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(shapes, split):
    shutil.rmtree(os.path.join(shapes, split))
    with pytest.raises(DataError, match=rf"{split} is missing: the dataset needs {split}/<class>/<images>"):
        check_dataset(shapes)


def test_split_without_classes(shapes):
    shutil.rmtree(os.path.join(shapes, "val"))
    os.makedirs(os.path.join(shapes, "val"))
    with pytest.raises(DataError, match="has no class folders"):
        check_dataset(shapes)


def test_empty_class(shapes):
    os.makedirs(os.path.join(shapes, "train", "triangle"))
    os.makedirs(os.path.join(shapes, "val", "triangle"))
    with pytest.raises(DataError, match=r"train/triangle has no images.*remove the folder"):
        check_dataset(shapes)


def test_val_classes_differ_from_train(shapes):
    os.rename(os.path.join(shapes, "val", "square"), os.path.join(shapes, "val", "rectangle"))
    with pytest.raises(DataError, match=r"only in train/: square; only in val/: rectangle"):
        check_dataset(shapes)


def test_batch_larger_than_data_cli(shapes, tmp_path):
    r = run_spach("train", *fast_flags(shapes, tmp_path / "o", batch=64))
    assert r.returncode == 2
    assert "has 24 images, fewer than one batch of 64" in r.stderr and "lower --batch-size" in r.stderr
    assert "Traceback" not in r.stderr


# ---- bad images: logged with their path, replaced, counted; --strict-data refuses them

def _add_bad_images(root):
    folder = os.path.join(root, "train", "circle")
    good = jpeg_bytes(draw_shape("circle", random.Random(1)))
    paths = {
        "zero": os.path.join(folder, "zero_bytes.JPEG"),
        "truncated": os.path.join(folder, "truncated.JPEG"),
        "text": os.path.join(folder, "not_an_image.JPEG"),
    }
    open(paths["zero"], "wb").close()
    with open(paths["truncated"], "wb") as f:
        f.write(good[: len(good) // 2])
    with open(paths["text"], "w") as f:
        f.write("this is not an image\n")
    return paths


def test_bad_images_are_skipped_logged_and_counted(shapes, tmp_path):
    paths = _add_bad_images(shapes)
    # a loader worker process does the decoding, as in real runs
    r = run_spach("train", *fast_flags(shapes, tmp_path / "o", epochs=1, batch=9, workers=1))
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    for p in paths.values():
        assert f"skipping unreadable image {p}" in out
    assert "skipped 3 unreadable training images" in out  # 27 images, 3 full batches: each drawn once


def test_strict_data_makes_a_bad_image_an_error(shapes, tmp_path):
    paths = _add_bad_images(shapes)
    r = run_spach("train", *fast_flags(shapes, tmp_path / "o", "--strict-data", epochs=1, batch=9, workers=1))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("spach: error: cannot decode image ")
    assert any(p in line for p in paths.values()) and "--strict-data" in line


def test_file_removed_or_unreadable_after_the_scan_is_replaced(shapes, monkeypatch):
    classes, samples = check_dataset(shapes)
    ds = TolerantImageFolder(samples["train"], classes)
    os.remove(samples["train"][0][0])
    img, target, n_bad = ds[0]
    assert n_bad == 1 and img.size == (32, 32) and target == samples["train"][1][1]

    real_open = os.open  # images are opened with os.open (regular files only, never blocking on a FIFO)
    locked = samples["train"][5][0]

    def guarded(path, *a, **kw):
        if path == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", guarded)
    _, _, n_bad = ds[5]
    assert n_bad == 1
    ds.strict = True
    with pytest.raises(DataError, match="Permission denied"):
        ds[5]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_permissions(shapes):
    classes, samples = check_dataset(shapes)
    os.chmod(samples["train"][0][0], 0)
    _, _, n_bad = TolerantImageFolder(samples["train"], classes)[0]
    assert n_bad == 1


# ---- odd but valid images just work

def test_grayscale_cmyk_rgba_palette_and_misnamed_png_load_as_rgb(tmp_path):
    base = draw_shape("square", random.Random(2))
    files = {}
    files["gray.JPEG"] = lambda p: base.convert("L").save(p, format="JPEG")
    files["cmyk.JPEG"] = lambda p: base.convert("CMYK").save(p, format="JPEG")
    files["rgba.png"] = lambda p: base.convert("RGBA").save(p)
    files["png_named.JPEG"] = lambda p: base.save(p, format="PNG")
    files["palette.png"] = lambda p: base.convert("P").save(p, transparency=0)
    files["gray16.png"] = lambda p: Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 256)).save(p)
    for name, write in files.items():
        path = str(tmp_path / name)
        write(path)
        img = load_rgb(path)
        assert img.mode == "RGB" and img.size == base.size, name
    # transparent pixels become white, not black
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert load_rgb(str(tmp_path / "clear.png")).getpixel((0, 0)) == (255, 255, 255)


def test_odd_formats_in_a_dataset_count_as_good(shapes):
    folder = os.path.join(shapes, "train", "square")
    img = draw_shape("square", random.Random(3))
    img.convert("CMYK").save(os.path.join(folder, "cmyk.JPEG"), format="JPEG")
    img.convert("L").save(os.path.join(folder, "gray.JPEG"), format="JPEG")
    img.save(os.path.join(folder, "actually_png.JPEG"), format="PNG")
    classes, samples = check_dataset(shapes)
    ds = TolerantImageFolder(samples["train"], classes, build_transform(True, 32), strict=True)
    for i in range(len(ds)):
        x, _, n_bad = ds[i]
        assert n_bad == 0 and x.shape == (3, 32, 32)


# ---- RandAugment at maximum magnitude on current Pillow

def test_deit_randaugment_applies_every_op_at_maximum_magnitude():
    import timm.data.auto_augment as aa
    tf = build_transform(True, 32, aa="rand-m9-mstd0.5-inc1")
    ra = next(t for t in tf.transforms if type(t).__name__ == "RandAugment")
    img = draw_shape("circle", random.Random(4))
    for op in ra.ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the top magnitude, always applied
        out = op(img)
        assert out.size == img.size, op.name
        if "Posterize" in op.name:
            assert out.getextrema() == ((0, 0),) * 3  # bits=0 keeps no bit: black, as Pillow < 12 did
    # timm's own table is untouched: an op built outside our transform still has timm's function
    plain = aa.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert plain.aug_fn is aa.posterize
    import PIL
    if int(PIL.__version__.split(".")[0]) >= 12:
        with pytest.raises(ValueError, match="bits"):
            plain(img)  # the crash our transform avoids


def test_randaugment_policy_runs_many_times_without_error():
    tf = build_transform(True, 32, aa="rand-m9-mstd0.5-inc1", reprob=0.25)
    rng = random.Random(5)
    random.seed(0)
    torch.manual_seed(0)
    for i in range(300):
        x = tf(draw_shape("cross", rng))
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


# ---- samplers

def _assert_reshuffles_per_epoch_and_resumes(sampler):
    e0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != e0
    sampler.set_epoch(0)
    assert list(sampler) == e0  # a function of (seed, epoch): resumable


def test_ra_sampler_shards_repeats_and_reshuffles_per_epoch():
    n, world = 100, 4
    shards = [list(RASampler(n, world, r, seed=0)) for r in range(world)]
    assert all(len(s) == n // world for s in shards)
    # the 3 copies of an image go to different ranks
    first = [s[0] for s in shards[:3]]
    assert len(set(first)) == 1
    _assert_reshuffles_per_epoch_and_resumes(RASampler(n, world, 0, seed=0))


def test_shuffle_sampler_partitions_without_overlap():
    shards = [list(ShuffleSampler(10, 3, r, seed=1)) for r in range(3)]
    flat = [i for s in shards for i in s]
    assert len(flat) == 9 and len(set(flat)) == 9
    _assert_reshuffles_per_epoch_and_resumes(ShuffleSampler(10, 3, 0, seed=1))


def test_training_samplers_refuse_fewer_samples_than_processes():
    for cls in (RASampler, ShuffleSampler):
        with pytest.raises(ValueError, match="3 samples cannot be split over 4 processes"):
            cls(3, 4, 0)


def test_eval_shard_sampler_covers_every_sample_exactly_once():
    for n, world in ((45, 2), (7, 3), (2, 4)):
        flat = [i for r in range(world) for i in EvalShardSampler(n, world, r)]
        assert sorted(flat) == list(range(n))


# ---- the embedded demo dataset

def test_demo_dataset_is_written_once_as_an_imagefolder(tmp_path, monkeypatch):
    from spach.data import prepare_demo_dataset
    from spach.data.demo import DATA_FILE
    monkeypatch.setenv("SPACH_CACHE", str(tmp_path))
    root = prepare_demo_dataset()
    assert root == str(tmp_path / "mnist5k")
    classes, samples = check_dataset(root)
    assert classes == [str(d) for d in range(10)]
    assert len(samples["train"]) == 4000 and len(samples["val"]) == 1000
    # the bundled digits themselves, padded to 32x32: the 400 first of each class train, the other 100 val
    with np.load(DATA_FILE) as f:
        digits, labels = f["images"], f["labels"]
    path, target = samples["val"][0]
    i = int(os.path.splitext(os.path.basename(path))[0])
    assert labels[i] == target and (labels[:i] == target).sum() == 400
    img = load_rgb(path)
    assert img.size == (32, 32)
    assert np.array_equal(np.asarray(img)[..., 0], np.pad(digits[i], 2))
    mtime = os.path.getmtime(samples["train"][0][0])
    assert prepare_demo_dataset() == root and os.path.getmtime(samples["train"][0][0]) == mtime


@pytest.mark.parametrize("damage", ["missing", "truncated", "bit_flipped", "not_npz", "wrong_arrays"])
def test_damaged_demo_data_file_is_one_line_naming_it_and_the_fix(tmp_path, monkeypatch, capsys, damage):
    from spach.cli import main
    from spach.data import demo
    bad = tmp_path / "mnist5k.npz"
    if damage == "truncated":
        bad.write_bytes(open(demo.DATA_FILE, "rb").read()[:300_000])
    elif damage == "bit_flipped":  # inside the compressed images: caught by the zip member's CRC
        data = bytearray(open(demo.DATA_FILE, "rb").read())
        data[400_000] ^= 0xFF
        bad.write_bytes(bytes(data))
    elif damage == "not_npz":
        bad.write_text("version https://git-lfs.github.com/spec/v1\n")  # what a Git LFS pointer would leave
    elif damage == "wrong_arrays":
        np.savez(bad, images=np.zeros((5, 32, 32), np.uint8), labels=np.zeros(5, np.uint8))
    monkeypatch.setattr(demo, "DATA_FILE", str(bad))
    monkeypatch.setenv("SPACH_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--output_dir", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"spach: error: the demo dataset file {bad} is missing or damaged") and "\n" not in err
    assert "reinstall spach" in err and "--data-path DIR" in err
    assert not (tmp_path / "cache" / "mnist5k").exists()  # nothing half-written for the next run to trust


def test_demo_data_ships_in_the_wheel(tmp_path):
    """`pip install .` (not only an editable install) gets the digits: pyproject's package-data lists them."""
    pytest.importorskip("setuptools", minversion="64")  # the build backend; venvs of Python >= 3.12 lack it
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = tmp_path / "tree"  # a copy: the build writes build/ and *.egg-info/ beside pyproject.toml
    shutil.copytree(os.path.join(repo, "src"), tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(repo, name), tree)
    build = "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=tree, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = tmp_path / out.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"spach/data/mnist5k.npz", "spach/data/mnist5k-NOTICE.txt", "spach/data/demo.py"} <= names
        shipped = z.read("spach/data/mnist5k.npz")
    with open(os.path.join(repo, "src", "spach", "data", "mnist5k.npz"), "rb") as f:
        assert shipped == f.read()
