"""spach eval --results-file: one row per evaluated checkpoint, appended, in CSV or JSON (timm validate.py's
columns), so that a sweep collects its results in one file."""
import csv
import json

import pytest

from spach.cli import main
from train_helpers import TINY_MODEL, fast_flags, make_shapes_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    data = make_shapes_folder(root / "shapes", n_train=16, n_val=8)
    out = root / "run"
    assert main(["train", *fast_flags(data, out, "--model-ema", epochs=1)]) == 0
    return data, out


def _eval(data, ckpt, results, *extra):
    return main(["eval", "--checkpoint", str(ckpt), "--data-path", str(data), "--device", "cpu", "--num_workers", "0",
                 "--results-file", str(results), *extra])


@pytest.mark.parametrize("ext", ["csv", "json"])
def test_each_evaluation_appends_one_row(run, tmp_path, ext, capsys):
    data, out = run
    results = tmp_path / f"sweep.{ext}"
    assert _eval(data, out / "checkpoint.pth", results) == 0
    assert _eval(data, out / "checkpoint.pth", results, "--ema") == 0
    log = capsys.readouterr().out
    accs = [float(x.split(": ")[1].rstrip("%")) for x in log.splitlines() if x.startswith("Accuracy of the network")]
    if ext == "csv":
        with open(results, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = json.loads(results.read_text())
    assert len(rows) == 2
    assert all(str(r["checkpoint"]).endswith("checkpoint.pth") for r in rows)
    assert [str(r["ema"]) for r in rows] == ["False", "True"]
    for row, acc in zip(rows, accs):
        assert row["model"] == TINY_MODEL and int(row["n_images"]) == 24 and int(row["img_size"]) == 32
        assert float(row["top1"]) == pytest.approx(acc, abs=0.05)
        assert float(row["top1"]) + float(row["top1_err"]) == pytest.approx(100)
        assert float(row["param_count"]) > 0 and row["interpolation"] == "bicubic"


def test_results_file_errors_are_one_line(run, tmp_path, capsys):
    data, out = run
    assert _eval(data, out / "checkpoint.pth", tmp_path / "r.txt") == 2
    assert "name a .csv or a .json file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    assert _eval(data, out / "checkpoint.pth", bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a JSON list" in err[0] and bad.read_text() == '{"not": "a list"}'
    assert main(["train", *fast_flags(data, tmp_path / "t", "--results-file", str(tmp_path / "r.csv"))]) == 2
    assert "use it with spach eval" in capsys.readouterr().err
