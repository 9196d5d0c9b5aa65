"""Every image mode Pillow opens becomes 8-bit RGB with the right scaling, or is counted as unreadable with its
reason; the work an image costs is bounded in every pipeline; no reader (shards included) waits on a FIFO."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from spach.data.folder import MAX_ASPECT, TolerantImageFolder, load_rgb


def _png(array, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG" if mode != "F" else "TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("name, array, mode, mean", [
    ("16-bit grey", (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16), None, 127.5),
    ("float in [0, 1]", np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64), "F", 127.5),
    ("float in [0, 255]", np.linspace(0, 255, 64 * 64, dtype=np.float32).reshape(64, 64), "F", 127.5),
    ("32-bit integers", (np.arange(64 * 64).reshape(64, 64) * 1000).astype(np.int32), "I", 127.5),
])
def test_high_depth_images_are_scaled_not_clipped(tmp_path, name, array, mode, mean):
    path = tmp_path / ("img.tif" if mode in ("F", "I") else "img.png")
    Image.fromarray(array, mode).save(path)
    img = load_rgb(str(path))
    assert img.mode == "RGB"
    got = np.asarray(img, dtype=np.float64)
    assert abs(got.mean() - mean) < 2.0, (name, got.mean())
    assert got.min() <= 1 and got.max() >= 254, name  # the whole range, not a white or black image


def test_non_finite_float_image_is_unreadable_with_its_reason(tmp_path):
    a = np.zeros((16, 16), np.float32)
    a[3, 3] = np.nan
    Image.fromarray(a, "F").save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="not all finite"):
        load_rgb(str(tmp_path / "nan.tif"))


@pytest.mark.parametrize("size", [(1, 250_000), (250_000, 1), (MAX_ASPECT * 3 + 1, 3)])
def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path, size):
    path = tmp_path / "strip.png"
    Image.new("L", size).save(path)
    assert path.stat().st_size < 4096  # a tiny file that would cost GBs once resized by its shorter side
    with pytest.raises(ValueError, match="aspect ratio"):
        load_rgb(str(path))
    from spach.data.fast_pipeline import _decode
    with pytest.raises(ValueError, match="aspect ratio"):
        _decode(str(path), lambda w, h: 1, use_cv2=True)


def test_a_training_folder_counts_such_images_as_unreadable(tmp_path):
    good, strip = tmp_path / "good.png", tmp_path / "strip.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(good)
    Image.new("L", (1, 5000)).save(strip)
    ds = TolerantImageFolder([(str(strip), 0), (str(good), 0)], ["a"], transform=None)
    img, target, replaced = ds[0]
    assert replaced == 1 and img.size == (8, 8)


def test_fifo_named_like_an_image_does_not_block_the_fast_pipeline(tmp_path):
    from spach.data.fast_pipeline import _decode
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="FIFO"):
        _decode(str(fifo), lambda w, h: 1, use_cv2=True)
    with pytest.raises(OSError, match="FIFO"):
        _decode(str(fifo), lambda w, h: 1, use_cv2=False)


def test_shard_index_fields_of_the_wrong_type_are_one_line(tmp_path):
    pytest.importorskip("webdataset")
    from spach.data.shards import WdsSource
    from spach.errors import DataError
    base = {"classes": ["a", "b"], "splits": {"train": {"filenames": ["t.tar"], "shard_lengths": [3]},
                                              "val": {"filenames": ["v.tar"], "shard_lengths": [2]}}}
    cases = [("shard_lengths", ["three"], "not a count"), ("shard_lengths", [-1], "not a count"),
             ("filenames", [7], "not a file name"), ("class_counts", [1], "2 counts")]
    for field, value, words in cases:
        info = json.loads(json.dumps(base))
        info["splits"]["train"][field] = value
        (tmp_path / "_info.json").write_text(json.dumps(info))
        with pytest.raises(DataError, match=words):
            WdsSource(str(tmp_path))


def test_a_shard_that_is_a_fifo_is_skipped_not_waited_on(tmp_path):
    pytest.importorskip("webdataset")
    from spach.data.shards import WdsSource
    os.mkfifo(tmp_path / "train-000000.tar")
    (tmp_path / "_info.json").write_text(json.dumps({
        "classes": ["a"], "splits": {"train": {"filenames": ["train-000000.tar"], "shard_lengths": [2]}}}))
    ds = WdsSource(str(tmp_path), splits=("train",)).dataset("train", None, train=False)
    items = list(ds)  # returns at once: the FIFO is reported as an unreadable shard ("is a FIFO"), not waited on
    assert items == []


def test_an_empty_file_is_named_the_same_way_in_training_and_in_predict(tmp_path):
    from spach.data.folder import EMPTY_FILE
    from spach.data.image_list import load_image
    from spach.errors import DataError
    empty, good = tmp_path / "empty.png", tmp_path / "good.png"
    empty.write_bytes(b"")
    Image.new("RGB", (8, 8)).save(good)
    with pytest.raises(DataError, match=r"empty file \(0 bytes\)"):
        load_image(str(empty), lambda img: img)
    ds = TolerantImageFolder([(str(empty), 0)], ["a"], transform=None, strict=True)
    with pytest.raises(Exception, match=r"empty file \(0 bytes\)"):
        ds[0]
    assert EMPTY_FILE == "empty file (0 bytes)"


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_weights_stored_as_integers_or_booleans_are_refused(tmp_path, dtype):
    import torch
    from safetensors.torch import save_file
    import spach
    from spach.errors import CheckpointError
    model = spach.create_model("spach_ms_xxs_patch4_224_attn", num_classes=3, img_size=32)
    sd = {k: (v.round().to(getattr(torch, dtype)) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError, match="integers or booleans where the model has floating-point"):
        spach.create_model("spach_ms_xxs_patch4_224_attn", checkpoint_path=str(path), num_classes=3, img_size=32)
    half = tmp_path / "half.safetensors"  # float16 still converts
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()},
              str(half))
    spach.create_model("spach_ms_xxs_patch4_224_attn", checkpoint_path=str(half), num_classes=3, img_size=32)
