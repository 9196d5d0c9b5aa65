"""`spach plot`: a PNG of several runs' curves from their log.txt, tolerant of partial logs, clear errors
for missing folders and empty logs; TensorBoard scalars through the writer the training loop uses."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from spach.cli import main
from spach.commands.plot import read_log, run_labels
from spach.tb import scalar_tags


def _needs_matplotlib():
    pytest.importorskip("matplotlib", reason="spach[plot] extra (matplotlib) not installed")


def _write_log(folder, epochs, acc_offset=0.0, torn_tail=True, keys=None):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for e in range(epochs):
        entry = {"train_lr": 1e-3 * (1 - e / epochs), "train_loss": 6.9 - 0.4 * e, "test_loss": 6.5 - 0.3 * e,
                 "test_acc1": 10.0 * e + acc_offset, "test_acc5": 12.0 * e + acc_offset, "epoch": e,
                 "n_parameters": 1234}
        if keys is not None:
            entry = {k: v for k, v in entry.items() if k in keys}
        lines.append(json.dumps(entry))
    text = "\n".join(lines) + "\n"
    if torn_tail:
        text += '{"train_lr": 0.0001, "train_lo'  # a run killed while writing its next line
    (folder / "log.txt").write_text(text)
    return folder


def test_plot_of_two_runs_is_a_png(tmp_path, capsys):
    _needs_matplotlib()
    a = _write_log(tmp_path / "a" / "run", 5)
    b = _write_log(tmp_path / "b" / "run", 3, acc_offset=5.0)
    out = tmp_path / "curves.png"
    assert main(["plot", str(a), str(b), "--output", str(out), "--title", "demo"]) == 0
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 300
        assert len(img.convert("L").getcolors(maxcolors=1 << 16) or []) != 1  # not a blank canvas
    printed = capsys.readouterr().out
    # same folder name twice: labels grow a parent folder to stay distinct
    assert "a/run: 5 epochs (last 4)" in printed and "b/run: 3 epochs" in printed
    assert "best val top-1 40.00% (epoch 4)" in printed


def test_read_log_tolerates_partial_and_resumed_logs(tmp_path, capsys):
    _needs_matplotlib()
    folder = _write_log(tmp_path / "run", 3, keys={"epoch", "train_loss"})
    entries = read_log(str(folder / "log.txt"))
    assert [e["epoch"] for e in entries] == [0, 1, 2]  # the torn last line is skipped silently
    assert capsys.readouterr().err == ""
    # a resumed run repeats epoch 1 (keep the later line); a corrupt line mid-file is skipped with a warning
    log = folder / "log.txt"
    log.write_text('{"epoch": 0, "train_loss": 3}\n{"epoch": 1, "train_loss": 2}\nnot json\n'
                   '{"epoch": 1, "train_loss": 1.5}\n\n{"train_loss": 1.0}\n')
    entries = read_log(str(log))
    assert [(e["epoch"], e["train_loss"]) for e in entries] == [(0, 3), (1, 1.5), (2, 1.0)]
    assert "skipped 1 line(s)" in capsys.readouterr().err
    # a log with only some keys still plots (the other panels say there is no data)
    assert main(["plot", str(folder), "--output", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


def test_run_labels_are_short_and_unique():
    assert run_labels(["out/r1", "out/r2"]) == ["r1", "r2"]
    assert run_labels(["x/r1", "y/r1/log.txt"]) == ["x/r1", "y/r1"]


def test_missing_folder_is_one_clear_line(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = subprocess.run([sys.executable, "-m", "spach", "plot", str(missing), "--output", str(tmp_path / "p.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spach: error: ") and str(missing) in lines[0]
    assert not (tmp_path / "p.png").exists()


def test_plot_errors(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 2
    assert f"{empty} has no log.txt" in capsys.readouterr().err
    (empty / "log.txt").write_text("\n\n")
    assert main(["plot", str(empty)]) == 2
    assert "has no epochs yet" in capsys.readouterr().err
    run = _write_log(tmp_path / "run", 2)
    assert main(["plot", str(run), "--output", str(tmp_path / "p.jpg")]) == 2
    assert "name it *.png" in capsys.readouterr().err
    # without tensorboard: the install command, before anything is written
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(["plot", str(run), "--output", str(tmp_path / "q.png"), "--tensorboard", str(tmp_path / "tb")]) == 2
    assert "pip install 'spach[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "q.png").exists() and not (tmp_path / "tb").exists()
    # without matplotlib: the install command
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    assert main(["plot", str(run), "--output", str(tmp_path / "p.png")]) == 2
    assert "pip install 'spach[plot]'" in capsys.readouterr().err


def test_scalar_tags_map_log_keys():
    tags = scalar_tags({"train_loss": 2.5, "train_lr": 1e-3, "test_acc1": 50, "epoch": 3, "n_parameters": 9,
                        "note": "x", "test_acc5": float("nan"), "flag": True})
    assert tags == {"train/loss": 2.5, "train/lr": 1e-3, "test/acc1": 50.0}


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="spach[tensorboard] extra not installed")
    _needs_matplotlib()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from spach.tb import TensorBoardWriter
    # what the training loop's TensorBoard sink does each epoch
    live = tmp_path / "live"
    with TensorBoardWriter(str(live)) as tb:
        for epoch in range(3):
            stats = {"epoch": epoch, "train_loss": 3.0 - epoch, "test_acc1": 10.0 * epoch}
            assert tb.write(stats, epoch) == 2
    acc = EventAccumulator(str(live))
    acc.Reload()
    assert [(s.step, s.value) for s in acc.Scalars("train/loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]

    # spach plot --tensorboard replays finished runs
    run = _write_log(tmp_path / "run1", 4)
    tb = tmp_path / "tb"
    assert main(["plot", str(run), "--output", str(tmp_path / "p.png"), "--tensorboard", str(tb)]) == 0
    acc = EventAccumulator(str(tb / "run1"))
    acc.Reload()
    assert {"train/loss", "train/lr", "test/loss", "test/acc1", "test/acc5"} <= set(acc.Tags()["scalars"])
    assert [s.value for s in acc.Scalars("test/acc1")] == [0.0, 10.0, 20.0, 30.0]
