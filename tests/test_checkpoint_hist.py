"""--checkpoint-hist K (the K best epoch checkpoints, timm's rule) and `spach average` (their mean)."""
import json
import logging
import os

import pytest
import torch

from spach.cli import main
from spach.train import history
from train_helpers import fast_flags, make_shapes_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _timm_kept(accs, k):
    """timm's CheckpointSaver over a run's per-epoch top-1: in while there is room, else only when strictly better
    than the worst kept; best first, ties the earlier epoch first."""
    kept = []
    for epoch, acc in enumerate(accs):
        if len(kept) < k or acc > kept[-1][1]:
            kept = sorted(kept + [(epoch, acc)], key=lambda e: (-e[1], e[0]))[:k]
    return kept


def _hist_files(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("checkpoint-") and f.endswith(".pth"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("shapes"), n_train=32, n_val=12)


def test_history_keeps_the_best_resumes_and_averages(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    # a low lr, so that the top-1 moves from epoch to epoch and the history evicts
    flags = lambda epochs: ["train", *fast_flags(shapes, out, "--checkpoint-hist", "2", epochs=epochs, lr=3e-4)]
    assert main(flags(2)) == 0
    (out / "checkpoint-99.pth").write_bytes(b"not a checkpoint of this run")  # a stranger matching the pattern
    assert main(flags(4)) == 0  # the same command, more epochs: resumes and continues the history
    assert "auto resume from" in capsys.readouterr().out
    accs = [json.loads(line)["test_acc1"] for line in (out / "log.txt").read_text().splitlines()]
    assert len(accs) == 4
    kept = _timm_kept(accs, 2)
    assert _hist_files(out) == sorted([f"checkpoint-{e}.pth" for e, _ in kept] + ["checkpoint-99.pth"])
    assert (out / "checkpoint-99.pth").read_bytes() == b"not a checkpoint of this run"  # never deleted
    if 3 in [e for e, _ in kept]:  # the last epoch's history file is checkpoint.pth itself, hard-linked
        assert os.path.samefile(out / "checkpoint-3.pth", out / "checkpoint.pth")
    for epoch, acc in kept:  # each file is its epoch's checkpoint
        ck = _load(out / f"checkpoint-{epoch}.pth")
        assert ck["epoch"] == epoch and ck["log_stats"]["test_acc1"] == acc

    # spach average: a file that is not a checkpoint is named in one line
    rc = main(["average", "--input", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint-99.pth" in err and len(err.strip().splitlines()) == 1
    (out / "checkpoint-99.pth").unlink()
    assert main(["average", "--input", str(out)]) == 0
    capsys.readouterr()
    averaged = _load(out / "averaged.pth")
    assert [a["epoch"] for a in averaged["averaged_from"]] == [e for e, _ in kept]  # best first
    assert averaged["class_names"] == ["circle", "cross", "square"]
    sds = [_load(out / f"checkpoint-{e}.pth")["model"] for e, _ in kept]
    assert averaged["model"].keys() == sds[0].keys()
    for key, value in averaged["model"].items():
        if value.is_floating_point():
            mean = sum(sd[key].to(torch.float64) for sd in sds) / len(sds)
            assert torch.equal(value, mean.to(value.dtype)), key
        else:
            assert torch.equal(value, sds[0][key]), key

    rc = main(["eval", "--checkpoint", str(out / "averaged.pth"), "--data-path", shapes, "--device", "cpu",
               "--num_workers", "0"])
    assert rc == 0 and "Accuracy of the network on the 36 test images: " in capsys.readouterr().out


def _fake_checkpoint(path, epoch, acc, model="spach_ms_xxs_patch4_224_attn", classes=("a", "b"), seed=0, ema=False,
                     shape=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    sd = {"head.weight": torch.randn(shape, generator=g), "bn.num_batches_tracked": torch.tensor(epoch + 1)}
    torch.save({"model": sd, "model_ema": {k: v * 2 for k, v in sd.items()} if ema else None, "epoch": epoch,
                "args": {"model": model}, "class_names": list(classes), "log_stats": {"test_acc1": acc}}, path)


@pytest.mark.parametrize("case", ["mismatch_classes", "mismatch_shape", "empty", "output_is_input", "not_a_folder"])
def test_average_refusals_are_one_line(tmp_path, capsys, case):
    folder = tmp_path / "run"
    folder.mkdir()
    _fake_checkpoint(folder / "checkpoint-0.pth", 0, 50.0)
    output = []
    if case == "mismatch_classes":
        _fake_checkpoint(folder / "checkpoint-1.pth", 1, 40.0, classes=("a", "c"))
        expect = "checkpoint-1.pth"
    elif case == "mismatch_shape":
        _fake_checkpoint(folder / "checkpoint-1.pth", 1, 40.0, shape=(4, 2))
        expect = "head.weight"
    elif case == "empty":
        os.remove(folder / "checkpoint-0.pth")
        expect = "--checkpoint-hist"
    elif case == "output_is_input":
        output = ["--output", str(folder / "checkpoint-0.pth")]
        expect = "one of the checkpoints"
    else:
        folder = folder / "checkpoint-0.pth"
        expect = "output folder"
    rc = main(["average", "--input", str(folder), *output])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err


def test_average_uses_ema_weights_when_every_file_has_them(tmp_path, capsys):
    for epoch, acc in enumerate((10.0, 30.0, 20.0)):
        _fake_checkpoint(tmp_path / f"checkpoint-{epoch}.pth", epoch, acc, seed=epoch, ema=True)
    assert main(["average", "--input", str(tmp_path), "-n", "2"]) == 0
    out = _load(tmp_path / "averaged.pth")
    a, b = (_load(tmp_path / f"checkpoint-{e}.pth")["model_ema"] for e in (1, 2))  # the 2 best: epochs 1, 2
    assert out["averaged_ema"] is True and [f["epoch"] for f in out["averaged_from"]] == [1, 2]
    assert torch.equal(out["model"]["head.weight"],
                       ((a["head.weight"].double() + b["head.weight"].double()) / 2).float())
    assert torch.equal(out["model"]["bn.num_batches_tracked"], a["bn.num_batches_tracked"])  # from the best
    assert main(["average", "--input", str(tmp_path), "--no-use-ema", "--no-sort", "--output",
                 str(tmp_path / "plain.pth")]) == 0
    plain = _load(tmp_path / "plain.pth")
    assert plain["averaged_ema"] is False and [f["epoch"] for f in plain["averaged_from"]] == [0, 1, 2]


# --- the history's own bookkeeping, on small stand-in checkpoints ----------------------------------------------
def _epoch(folder, epoch, acc, k=2):
    """What the runner does per epoch: commit checkpoint.pth (by rename), then update the history."""
    tmp = folder / "next-checkpoint"
    torch.save({"epoch": epoch, "log_stats": {"test_acc1": acc}}, tmp)
    os.replace(tmp, folder / "checkpoint.pth")
    return [(e["epoch"], e["acc1"]) for e in history.update_history(str(folder), epoch, acc, k)]


def test_history_follows_timms_rule_and_links(tmp_path):
    accs = [50.0, 60.0, 60.0, 40.0, 70.0, 60.0]
    for epoch, acc in enumerate(accs):
        kept = _epoch(tmp_path, epoch, acc)
        assert kept == _timm_kept(accs[:epoch + 1], 2)
    assert _hist_files(tmp_path) == ["checkpoint-1.pth", "checkpoint-4.pth"]  # ties: the earlier epoch stays
    assert _load(tmp_path / "checkpoint-4.pth")["epoch"] == 4  # the link kept the epoch's content


def test_rerun_epochs_supersede_their_entries(tmp_path, caplog):
    for epoch, acc in enumerate((10.0, 30.0, 20.0)):
        _epoch(tmp_path, epoch, acc, k=3)
    # the run goes on from the end of epoch 0 again (--no-auto-resume --resume of an earlier checkpoint)
    with caplog.at_level(logging.WARNING, logger="spach.train"):
        assert _epoch(tmp_path, 1, 5.0, k=3) == [(0, 10.0), (1, 5.0)]
    assert _hist_files(tmp_path) == ["checkpoint-0.pth", "checkpoint-1.pth"]
    assert _load(tmp_path / "checkpoint-1.pth")["log_stats"]["test_acc1"] == 5.0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # all of it was this run's own


def test_history_copies_where_links_are_unsupported(tmp_path, monkeypatch):
    def no_link(*a, **kw):
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_link)
    assert _epoch(tmp_path, 0, 10.0) == [(0, 10.0)]
    assert (tmp_path / "checkpoint-0.pth").read_bytes() == (tmp_path / "checkpoint.pth").read_bytes()


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_mid_update_is_finished_by_the_next_epoch(tmp_path, monkeypatch, when):
    _epoch(tmp_path, 0, 10.0)
    _epoch(tmp_path, 1, 20.0)
    real = history._duplicate

    def killed(src, dst):
        if when == "after":
            real(src, dst)
        raise KeyboardInterrupt
    monkeypatch.setattr(history, "_duplicate", killed)
    with pytest.raises(KeyboardInterrupt):
        _epoch(tmp_path, 2, 30.0)  # would evict epoch 0
    monkeypatch.setattr(history, "_duplicate", real)
    kept = _epoch(tmp_path, 3, 5.0)
    if when == "after":  # epoch 2's file was in place: adopted, and its eviction done
        assert kept == [(2, 30.0), (1, 20.0)]
        assert _hist_files(tmp_path) == ["checkpoint-1.pth", "checkpoint-2.pth"]
    else:  # never written: forgotten, nothing lost
        assert kept == [(1, 20.0), (0, 10.0)]
        assert _hist_files(tmp_path) == ["checkpoint-0.pth", "checkpoint-1.pth"]


def test_files_the_run_did_not_write_are_never_deleted(tmp_path, caplog):
    _epoch(tmp_path, 0, 10.0)
    # the user replaces the history file with a file of their own, and puts one at a name the run will want
    os.remove(tmp_path / "checkpoint-0.pth")
    (tmp_path / "checkpoint-0.pth").write_bytes(b"mine")
    (tmp_path / "checkpoint-1.pth").write_bytes(b"mine too")
    with caplog.at_level(logging.WARNING, logger="spach.train"):
        assert _epoch(tmp_path, 1, 20.0) == []
        assert _epoch(tmp_path, 2, 30.0) == [(2, 30.0)]
        assert _epoch(tmp_path, 3, 40.0) == [(3, 40.0), (2, 30.0)]
        assert _epoch(tmp_path, 4, 50.0) == [(4, 50.0), (3, 40.0)]
    assert (tmp_path / "checkpoint-0.pth").read_bytes() == b"mine"
    assert (tmp_path / "checkpoint-1.pth").read_bytes() == b"mine too"
    assert "not written by this run" in caplog.text
    # a damaged record: a warning, and nothing is deleted on its word
    (tmp_path / history.HISTORY_NAME).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="spach.train"):
        assert _epoch(tmp_path, 5, 1.0) == [(5, 1.0)]
    assert "damaged" in caplog.text
    assert {"checkpoint-3.pth", "checkpoint-4.pth"} <= set(_hist_files(tmp_path))


def test_a_failed_history_write_warns_and_training_goes_on(tmp_path, monkeypatch, caplog):
    from types import SimpleNamespace

    def full(*a, **kw):
        raise OSError(28, "No space left on device", str(tmp_path / "checkpoint-0.pth"))
    monkeypatch.setattr(history, "update_history", full)
    output = SimpleNamespace(checkpoint_hist=2, output_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="spach.train"):
        history.keep_history(output, 0, {"test_acc1": 1.0})  # no exception
    assert "not updated for epoch 0" in caplog.text and "disk is full" in caplog.text
