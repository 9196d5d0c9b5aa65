"""--data-set WDS / HFDS and `spach pack`: shards written from an ImageFolder, trained and evaluated from, split over
ranks and workers, resumed, and their damage skipped and counted (or refused under --strict-data)."""
import contextlib
import io
import json
import os
import re
import shutil
import tarfile

import pytest
import torch

pytest.importorskip("webdataset", reason="spach[shards] extra (webdataset) not installed")

from spach.cli import main  # noqa: E402
from spach.data.folder import check_dataset  # noqa: E402
from spach.data.pack import pack_imagefolder  # noqa: E402
from spach.data.shards import ShardDataset, WdsSource, split_slots  # noqa: E402
from spach.errors import DataError  # noqa: E402
from train_helpers import fast_flags, make_shapes_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    # JPEGs, so the byte-for-byte check covers the format shards are made for; 96 train / 36 val images
    return make_shapes_folder(tmp_path_factory.mktemp("shapes"), n_train=32, n_val=12, ext=".jpg")


@pytest.fixture(scope="module")
def wds(shapes, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("wds"))
    pack_imagefolder(shapes, out, shard_size=12, show_progress=False)
    return out


def _members(tar_path):
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _run(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


# ---------------------------------------------------------------- spach pack


def test_pack_keeps_bytes_class_indices_and_counts(shapes, wds):
    classes, samples = check_dataset(shapes)
    info = json.load(open(os.path.join(wds, "_info.json")))
    assert info["classes"] == classes == ["circle", "cross", "square"]
    for split, n in (("train", 96), ("val", 36)):
        entry = info["splits"][split]
        assert entry["num_samples"] == n == sum(entry["shard_lengths"])
        assert entry["class_counts"] == [n // 3] * 3
    # every image's bytes, unchanged, under the ImageFolder's class index
    by_bytes = {open(p, "rb").read(): t for split in samples for p, t in samples[split]}
    seen = 0
    for split in ("train", "val"):
        for name in info["splits"][split]["filenames"]:
            m = _members(os.path.join(wds, name))
            for member, data in m.items():
                if member.endswith(".jpg"):
                    assert by_bytes[data] == int(m[member[:-4] + ".cls"])
                    seen += 1
    assert seen == 132
    # train shards mix classes (a sequential reader must not see one class at a time); val keeps folder order
    first = _members(os.path.join(wds, "train-000000.tar"))
    assert len({v for k, v in first.items() if k.endswith(".cls")}) > 1


def test_interrupted_pack_is_finished_by_the_same_command(shapes, wds, tmp_path, monkeypatch):
    from spach.data import pack
    out = str(tmp_path / "wds")
    real, calls = pack._write_shard, []

    def dies_on_third(path, items, progress):
        calls.append(path)
        if len(calls) == 3:
            with open(path + ".tmp", "wb") as f:
                f.write(b"half a shard")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        real(path, items, progress)

    monkeypatch.setattr(pack, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        pack_imagefolder(shapes, out, shard_size=12, show_progress=False)
    assert not os.path.exists(os.path.join(out, "_info.json"))
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == ["train-000000.tar", "train-000001.tar"]
    monkeypatch.setattr(pack, "_write_shard", real)
    mtime = os.path.getmtime(os.path.join(out, "train-000000.tar"))
    assert _run(["pack", shapes, out, "--shard-size", "12"])[0] == 0
    assert os.path.getmtime(os.path.join(out, "train-000000.tar")) == mtime  # whole shards are kept
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    for name in os.listdir(wds):  # the result is the uninterrupted pack's, shard for shard
        if name.endswith(".tar"):
            assert _members(os.path.join(out, name)) == _members(os.path.join(wds, name)), name
    with pytest.raises(DataError, match=r"holds shards of another pack \(different shard_size\)"):
        pack_imagefolder(shapes, out, shard_size=10, show_progress=False)


def test_pack_refuses_splits_with_different_classes(shapes, tmp_path):
    data = _copy(shapes, tmp_path / "mismatch")
    shutil.rmtree(os.path.join(data, "val", "square"))
    with pytest.raises(DataError, match="differ from those of .*only in train/: square"):
        pack_imagefolder(data, str(tmp_path / "out"), show_progress=False)


# ---------------------------------------------------------------- epochs, ranks, workers


class _Recorder(ShardDataset):
    """Records the shards it opens."""

    def _open(self, path):
        self.opened.append(os.path.basename(path))
        return super()._open(path)


def _read(source, rank, world, worker, workers, epoch, train=True, batch=8):
    ds = source.dataset("train" if train else "val", None, train=train, num_replicas=world, rank=rank, seed=3,
                        batch_size=batch)
    ds.__class__ = _Recorder
    ds.opened = []
    ds._worker = lambda: (worker, workers)
    ds.set_epoch(epoch)
    items = [(t, img.tobytes()) for img, t, _ in ds]
    return ds, items


def test_ranks_and_workers_read_disjoint_shards_reshuffled_each_epoch(wds):
    source = WdsSource(wds)  # 96 train images in 8 shards of 12
    orders = []
    for epoch in (0, 1):
        opened, counts = [], {}
        for rank in (0, 1):
            for worker in (0, 1):
                ds, items = _read(source, rank, 2, worker, 2, epoch)
                opened.append(ds.opened)
                counts[rank] = counts.get(rank, 0) + len(items)
        flat = [s for o in opened for s in o]
        assert sorted(flat) == sorted(os.path.basename(s) for s in source.splits["train"].shards)  # each once
        assert counts == {0: len(ds), 1: len(ds)} and len(ds) == (96 // 2) // 8 * 8  # known from the index
        orders.append(opened)
    assert orders[0] != orders[1]  # reshuffled by epoch
    again = [_read(source, 0, 2, 0, 2, 0)[0].opened, _read(source, 0, 2, 0, 2, 0)[1]]
    assert again[0] == orders[0][0]
    assert again[1] == _read(source, 0, 2, 0, 2, 0)[1]  # the same seed and epoch: the same samples in order
    # fewer shards than readers: split by sample, still disjoint and complete
    assert split_slots(2, 1, 4, 0, 1) == ([0, 1], (4, 1))
    assert split_slots(8, 1, 2, 0, 3) == ([1, 7], (1, 0))  # rank 1 has shards 1, 3, 5, 7: worker 0 of 3 gets 1, 7
    assert split_slots(2, 1, 2, 1, 2) == ([1], (2, 1))


def test_validation_from_shards_counts_every_image_once(wds):
    source = WdsSource(wds)  # 36 val images in 3 shards
    for world, workers in ((1, 1), (2, 1), (2, 2), (4, 2)):
        seen = []
        for rank in range(world):
            n_rank = 0
            for worker in range(workers):
                ds, items = _read(source, rank, world, worker, workers, 0, train=False)
                seen += items
                n_rank += len(items)
            assert n_rank == len(ds)  # the length each rank announces is what it reads
        assert len(seen) == 36 and len(set(b for _, b in seen)) == 36, (world, workers)


# ---------------------------------------------------------------- training and evaluation


def test_mnist5k_packed_with_the_folders_class_indices(tmp_path):
    from spach.data import prepare_demo_dataset
    _, samples = check_dataset(prepare_demo_dataset())
    folder = tmp_path / "mnist"  # 20 train / 5 val digits per class
    for split, per_class in (("train", 20), ("val", 5)):
        taken = {}
        for path, t in samples[split]:
            if taken.get(t, 0) < per_class:
                taken[t] = taken.get(t, 0) + 1
                dst = folder / split / os.path.basename(os.path.dirname(path))
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dst)
    classes, subset = check_dataset(str(folder))
    assert _run(["pack", str(folder), str(tmp_path / "wds"), "--shard-size", "64"])[0] == 0
    source = WdsSource(str(tmp_path / "wds"))
    assert source.classes == classes == [str(d) for d in range(10)]
    assert source.count("train") == 200 and source.splits["train"].class_counts == [20] * 10
    label_of = {open(p, "rb").read(): t for p, t in subset["train"] + subset["val"]}
    for split in ("train", "val"):
        for shard in source.splits[split].shards:
            m = _members(shard)
            pngs = [k for k in m if k.endswith(".png")]
            assert pngs and all(label_of[m[k]] == int(m[k[:-4] + ".cls"]) for k in pngs)


def test_shards_and_folder_train_alike_with_the_same_seed(shapes, wds, tmp_path):
    runs = {}
    for kind, data in (("IMNET", shapes), ("WDS", wds)):
        out = tmp_path / kind
        rc, stdout = _run(["train", *fast_flags(data, out, "--data-set", kind, epochs=2, workers=1)])
        assert rc == 0, stdout[-2000:]
        assert "steps: 6" in stdout  # 96 // 16, from the index as from the folder
        runs[kind] = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
        ck = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
        assert ck["class_names"] == ["circle", "cross", "square"]
    for log in runs.values():
        assert max(l["test_acc1"] for l in log) >= 60.0, runs  # chance is 33%
        assert log[-1]["train_loss"] < log[0]["train_loss"]


def test_resumed_shard_run_ends_bit_identical(wds, tmp_path, monkeypatch):
    flags = ["--data-set", "WDS", "--repeated-aug"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert _run(["train", *fast_flags(wds, straight, *flags, epochs=2, workers=1)])[0] == 0
    from spach.train import runner
    real = runner.train_one_epoch

    def interrupted(*a, **kw):
        if a[2] == 1:  # epoch
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "train_one_epoch", interrupted)
    assert _run(["train", *fast_flags(wds, broken, *flags, epochs=2, workers=1)])[0] == 130
    monkeypatch.setattr(runner, "train_one_epoch", real)
    rc, stdout = _run(["train", *fast_flags(wds, broken, *flags, epochs=2, workers=1)])
    assert rc == 0 and "auto resume from" in stdout
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(broken / "checkpoint.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_hugging_face_datasets_on_disk_train_and_evaluate(shapes, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    classes, samples = check_dataset(shapes)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    dd = datasets.DatasetDict({name: datasets.Dataset.from_dict(
        {"image": [p for p, _ in samples[split]], "label": [t for _, t in samples[split]]}, features=feats)
        for split, name in (("train", "train"), ("val", "validation"))})
    dd.save_to_disk(str(tmp_path / "saved"))
    rc, stdout = _run(["train", *fast_flags(tmp_path / "saved", tmp_path / "out", "--data-set", "HFDS", epochs=1)])
    assert rc == 0 and "96 train / 36 val images, 3 classes" in stdout
    assert json.loads((tmp_path / "out" / "log.txt").read_text())["test_acc1"] > 33.4
    hub = tmp_path / "hub" / "data"  # the layout of a Hub dataset repository cloned or downloaded
    hub.mkdir(parents=True)
    for name in dd:
        dd[name].to_parquet(str(hub / f"{name}-00000-of-00001.parquet"))
    rc, hub_out = _run(["eval", "--checkpoint", str(tmp_path / "out" / "checkpoint.pth"), "--data-path",
                        str(tmp_path / "hub"), "--data-set", "HFDS", "--device", "cpu", "--num_workers", "0"])
    assert rc == 0
    rc, folder_out = _run(["eval", "--checkpoint", str(tmp_path / "out" / "checkpoint.pth"), "--data-path", shapes,
                           "--device", "cpu", "--num_workers", "0"])
    line = re.compile(r"^\* Acc@1 .*$", re.M)
    assert line.findall(hub_out) == line.findall(folder_out)  # the same images, labels and result
    # a validation split whose class list differs is refused, as for folders
    other = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    datasets.DatasetDict({"train": dd["train"], "validation": dd["validation"].cast(other)}).save_to_disk(
        str(tmp_path / "bad"))
    with pytest.raises(DataError, match="differ from those of split 'train'"):
        from spach.data.shards import HfdsSource
        HfdsSource(str(tmp_path / "bad"))


# ---------------------------------------------------------------- damaged shards


def _rewrite(tar_path, members):
    with tarfile.open(tar_path, "w") as tf:
        for name in sorted(members):
            ti = tarfile.TarInfo(name)
            ti.size = len(members[name])
            tf.addfile(ti, io.BytesIO(members[name]))


def _damage(d, kinds):
    """Damage the val shards of the copy ``d``: 'image' / 'label' / 'range' hit one sample each of the first
    shard, 'truncated' / 'cut' cut the second in a member or between two, 'missing' removes the third (still in
    the index)."""
    names = json.load(open(os.path.join(d, "_info.json")))["splits"]["val"]["filenames"]  # 3 shards of 12
    m = _members(os.path.join(d, names[0]))
    keys = sorted({k.split(".")[0] for k in m})
    if "image" in kinds:
        m[keys[0] + ".jpg"] = b"not an image"   # a member that does not decode
    if "label" in kinds:
        del m[keys[1] + ".cls"]                 # a sample without its label
    if "range" in kinds:
        m[keys[2] + ".cls"] = b"7"              # a label outside the 3 classes
    _rewrite(os.path.join(d, names[0]), m)
    second = os.path.join(d, names[1])
    if "truncated" in kinds:  # cut inside a member's data: the tar reader fails
        with tarfile.open(second) as tf:
            cut = tf.getmembers()[9].offset_data + 100
        with open(second, "r+b") as f:
            f.truncate(cut)
    if "cut" in kinds:  # cut exactly before a member's header: reads as a shorter, valid tar
        with tarfile.open(second) as tf:
            cut = tf.getmembers()[10].offset
        with open(second, "r+b") as f:
            f.truncate(cut)
    if "missing" in kinds:
        os.remove(os.path.join(d, names[2]))
    return names


def test_damaged_shards_are_skipped_and_counted(wds, tmp_path, caplog):
    d = _copy(wds, tmp_path / "damaged")
    names = _damage(d, ("image", "label", "range", "truncated", "missing"))
    items = list(WdsSource(d).dataset("val", None, train=False))
    skipped = sum(flag for _, _, flag in items)
    # 3 bad samples in the first shard, the rest of the second after the cut, all 12 of the third
    assert 9 + 1 <= len(items) < 9 + 12
    assert len(items) + skipped == 36  # every image of the index is either read or counted
    text = caplog.text
    assert f"in shard {os.path.join(d, names[0])}" in text and "not a decodable image" in text
    assert "no label" in text and "outside the index's 3 classes" in text
    assert "truncated or not a tar" in text and "cannot open it" in text


@pytest.mark.parametrize("damage, shard, says", [
    ("image", 0, ".jpg: not a decodable image"), ("label", 0, ".jpg: no label"),
    ("range", 0, ".cls: label 7 is outside the index's 3 classes"),
    ("truncated", 1, ": after member 00000016.cls: truncated or not a tar (ReadError"),
    ("cut", 1, ": after member 00000016.jpg: truncated: it ends after 5 of the 12 samples the index lists"),
    ("missing", 2, ": (whole shard): cannot open it")])
def test_strict_data_names_the_shard_and_member(wds, tmp_path, damage, shard, says):
    d = _copy(wds, tmp_path / damage)
    names = _damage(d, (damage,))
    with pytest.raises(DataError) as e:
        list(WdsSource(d).dataset("val", None, train=False, strict=True))
    msg = str(e.value)
    assert msg.startswith(f"shard {os.path.join(d, names[shard])}: ") and "--strict-data" in msg
    assert says in msg, msg


def test_a_worker_with_no_readable_shard_stops_instead_of_waiting(wds, tmp_path):
    d = _copy(wds, tmp_path / "empty")
    for name in os.listdir(d):
        if name.startswith("train-"):
            open(os.path.join(d, name), "wb").close()  # zero bytes: not a tar
    ds = WdsSource(d).dataset("train", None, train=True, batch_size=8)
    with pytest.raises(DataError, match="no readable sample in shard"):
        next(iter(ds))


def test_ddp_reads_disjoint_shards_and_reduces_counts(wds, tmp_path):
    from test_distributed import torchrun
    d = _copy(wds, tmp_path / "one-bad")
    info = json.load(open(os.path.join(d, "_info.json")))
    last = os.path.join(d, info["splits"]["val"]["filenames"][-1])
    m = _members(last)
    m[sorted(k for k in m if k.endswith(".jpg"))[0]] = b"garbage"
    _rewrite(last, m)
    out = tmp_path / "ddp"
    r = torchrun("train", *fast_flags(d, out, "--data-set", "WDS", "--dist-eval", epochs=1, batch=8, workers=1))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "steps: 6" in r.stdout and "world_size: 2" in r.stdout  # (96 // 2) // 8 per rank, from the index
    assert "Accuracy of the network on the 35 test images" in r.stdout  # 36 - 1 bad, summed over both ranks
    assert "1 unreadable validation images" in r.stdout
    ddp_line = re.findall(r"^\* Acc@1 .*$", r.stdout, re.M)[-1]
    rc, single = _run(["eval", "--checkpoint", str(out / "checkpoint.pth"), "--data-path", d, "--data-set", "WDS",
                       "--device", "cpu", "--num_workers", "0"])
    assert rc == 0
    assert re.findall(r"^\* Acc@1 .*$", single, re.M) == [ddp_line]


def test_launcher_trains_from_a_shard_path(wds):
    from test_launchers import TINY, launch
    out_id = f"pytest-{os.getpid()}-shards"
    try:
        r = launch("train_full_1p.sh", f"--data_path={wds}", "--data_set=WDS", *TINY, "--epochs=1", out_id=out_id)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert re.search(r"^Final Performance images/sec : [0-9.]+$", r.stdout, re.M)
        assert "96 train / 36 val images" in open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "test",
                                                               "output", out_id, f"train_{out_id}.log")).read()
    finally:
        shutil.rmtree(os.path.join(os.path.dirname(os.path.dirname(__file__)), "test", "output", out_id),
                      ignore_errors=True)


def test_loader_benchmark_compares_shards_with_the_folder(wds, shapes, capsys):
    rc = main(["benchmark", "--loader", "--data", wds, "--data-set", "WDS", "--against", shapes, "--images", "6",
               "--rounds", "2", "--img-size", "32", "--read-latency-ms", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^WDS +[0-9.]+ ", out, re.M) and re.search(r"^IMNET +[0-9.]+ ", out, re.M)
    assert re.search(r"^ratio WDS / IMNET: [0-9.]+x$", out, re.M) and "read latency 1 ms per request" in out


def test_missing_extra_says_how_to_install(wds, tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "webdataset", None)  # as if not installed
    rc = main(["train", *fast_flags(wds, tmp_path / "out", "--data-set", "WDS")])
    assert rc != 0
    assert "pip install 'spach[shards]'" in capsys.readouterr().err


def test_a_missing_train_shard_is_counted_once_per_epoch(wds, tmp_path):
    d = _copy(wds, tmp_path / "missing")
    names = json.load(open(os.path.join(d, "_info.json")))["splits"]["train"]["filenames"]  # 8 shards of 12
    for name in names[:5]:
        os.remove(os.path.join(d, name))
    ds = WdsSource(d).dataset("train", None, train=True, batch_size=8)
    for epoch in range(3):
        ds.set_epoch(epoch)
        items = list(ds)
        skipped = sum(flag for _, _, flag in items)
        # the epoch reads the 36 readable images again and again to fill its 96; the 60 of the missing shards
        # count once in it, not once per pass
        assert len(items) == 96 and skipped == 60, (epoch, len(items), skipped)


def test_a_stale_index_gives_one_val_size_and_says_so(wds, tmp_path, caplog):
    d = _copy(wds, tmp_path / "stale")
    path = os.path.join(d, "_info.json")
    info = json.load(open(path))
    info["splits"]["val"]["shard_lengths"][0] -= 2  # the index understates the first val shard
    json.dump(info, open(path, "w"))
    source = WdsSource(d)
    items = list(source.dataset("val", None, train=False))
    assert len(items) == source.count("val") == 34  # what the log's val size says is what is evaluated
    assert "holds more samples than the 10 its index lists" in caplog.text


# ---------------------------------------------------------------- mid-epoch resume


def _jitter(img):
    """A random augmentation that draws from all three CPU generators."""
    import random

    import numpy as np
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)[::4, ::4].copy())
    return x + torch.rand(1) + random.random() + float(np.random.rand())


class _Counting(ShardDataset):
    """Counts the images it decodes (in this process)."""

    decodes = 0

    def _decode(self, data):
        type(self).decodes += 1
        return super()._decode(data)


def _train_set(source, world, rank, batch, start=0, epoch=1, repeats=1):
    ds = source.dataset("train", _jitter, train=True, num_replicas=world, rank=rank, seed=5, batch_size=batch,
                        repeats=repeats)
    ds.__class__ = _Counting
    ds.set_epoch(epoch, start)
    return ds


def _batches(ds, batch, workers, stop=None):
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True)
    n = len(loader)
    out = []
    for x, t, flag in loader:
        out.append((x, t, flag))
        if len(out) == stop:
            break
    return n, out


def _same(a, b):
    assert len(a) == len(b)
    for (x, t, f), (y, u, g) in zip(a, b):
        assert torch.equal(x, y) and torch.equal(t, u) and torch.equal(f, g)


@pytest.mark.parametrize("world, workers, repeats", [(1, 0, 1), (1, 2, 3), (2, 0, 3), (2, 2, 1)])
def test_a_resumed_epoch_reads_the_rest_of_the_same_batches(wds, world, workers, repeats):
    source = WdsSource(wds)  # 96 train images in 8 shards of 12
    batch = 4
    steps = 96 // world // batch
    k = 3  # not a multiple of the workers: the resumed loader's worker 0 carries on for the old worker 1
    for rank in range(world):
        n, whole = _batches(_train_set(source, world, rank, batch, repeats=repeats), batch, workers)
        assert n == steps == len(whole)
        _, first = _batches(_train_set(source, world, rank, batch, repeats=repeats), batch, workers, stop=k)
        resumed = _train_set(source, world, rank, batch, start=k * batch * world, repeats=repeats)
        assert len(resumed) == (steps - k) * batch  # what is left of this rank's epoch
        n, rest = _batches(resumed, batch, workers)
        assert n == steps - k  # len(loader): the steps left in the epoch
        _same(first + rest, whole)
        # per-sample seeds: every place draws its own augmentation (repeated augmentation's copies too)
        assert len({float(v) for x, _, _ in whole for v in x[:, 0, 0, 0]}) == steps * batch
    done = _train_set(source, world, 0, batch, start=steps * batch * world)
    assert len(done) == 0 and list(done) == []
    for bad in (batch * world + world // 2 + 1, 96 + batch * world, -batch * world):
        with pytest.raises(ValueError, match="does not start a step"):
            _train_set(source, world, 0, batch, start=bad)


def test_a_resume_skips_without_decoding_and_keeps_the_callers_random_state(wds):
    import random

    import numpy as np
    source = WdsSource(wds)
    batch, k = 4, 5
    _Counting.decodes = 0
    whole = list(_train_set(source, 2, 1, batch))
    assert _Counting.decodes == len(whole) == 48
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    _Counting.decodes = 0
    rest = list(_train_set(source, 2, 1, batch, start=k * batch * 2))
    assert _Counting.decodes == len(rest) == 48 - k * batch  # the skipped samples are never decoded
    assert [t for _, t, _ in rest] == [t for _, t, _ in whole[k * batch:]]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, whole[k * batch:]))
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()


def test_an_undecodable_image_is_stood_in_for_alike_after_a_resume(wds, tmp_path):
    d = _copy(wds, tmp_path / "bad-images")
    names = json.load(open(os.path.join(d, "_info.json")))["splits"]["train"]["filenames"]
    for name in names[:3]:  # two bad images in each of three shards
        m = _members(os.path.join(d, name))
        for key in sorted(k for k in m if k.endswith(".jpg"))[3:5]:
            m[key] = b"not an image"
        _rewrite(os.path.join(d, name), m)
    source = WdsSource(d)
    batch = 4
    whole = list(_train_set(source, 1, 0, batch))
    assert len(whole) == 96 and sum(f for _, _, f in whole) == 6  # each bad image counted once, at its place
    for k in (1, 7, 12, 23):
        rest = list(_train_set(source, 1, 0, batch, start=k * batch))
        assert len(rest) == len(whole) - k * batch
        for (x, t, f), (y, u, g) in zip(rest, whole[k * batch:]):
            assert torch.equal(x, y) and t == u and f == g
