"""The project's own files are never written through a link it did not make, and every path a user names that
cannot be used (a link, a loop, a folder, a FIFO, a name too long, a folder inside the data) is one line."""
import contextlib
import json
import os
import subprocess
import sys

import pytest

from spach.cli import main
from spach.train.output_lock import LOCK_NAME, OutputDirLock
from train_helpers import REPO, fast_flags, make_shapes_folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("owndata") / "shapes", n_train=16, n_val=6)


def _one_line(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("name", [LOCK_NAME, "log_rank0.txt", "log.txt", "checkpoint.pth", "config.yaml"])
def test_a_link_in_the_output_folder_is_never_written_through(shapes, tmp_path, capsys, name, one_thread):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(victim, out / name)
    rc = main(["train", *fast_flags(shapes, out, epochs=1)])
    assert rc != 0
    _one_line(capsys, str(out / name), "symbolic link")
    assert victim.read_text() == "the user's own file\n"
    assert os.path.islink(out / name)


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_lock_path_that_is_not_a_file_is_one_line(shapes, tmp_path, capsys, kind):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.mkdir() if kind == "folder" else os.mkfifo(lock)
    assert main(["train", *fast_flags(shapes, out, epochs=1)]) != 0
    _one_line(capsys, str(lock), "folder" if kind == "folder" else "FIFO")
    assert not (out / "checkpoint.pth").exists()


@pytest.mark.parametrize("pid", [-1, 0, True, "12", 2 ** 40])
def test_a_lock_record_naming_an_impossible_process_is_taken_over(tmp_path, pid):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": pid, "boot_id": "x"}))
    lock = OutputDirLock(str(tmp_path))
    try:
        lock.acquire()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_output_folder_inside_the_data_is_refused_before_anything_is_written(shapes, capsys):
    out = os.path.join(shapes, "train", "run1")
    assert main(["train", *fast_flags(shapes, out, epochs=1)]) != 0
    _one_line(capsys, f"--output_dir {out} is inside --data-path {shapes}")
    assert not os.path.exists(out)


def test_pack_refuses_its_own_input_and_a_second_pack_into_one_folder(shapes, tmp_path, capsys):
    pytest.importorskip("webdataset")
    inner = os.path.join(shapes, "val", "packed")
    assert main(["pack", shapes, inner]) != 0
    _one_line(capsys, "is inside DIR")
    assert not os.path.exists(inner)
    out = tmp_path / "shards"
    out.mkdir()
    held = OutputDirLock(str(out), label="spach pack OUT").acquire()  # another pack under way (this process)
    try:
        r = subprocess.run([sys.executable, "-m", "spach", "pack", shapes, str(out)], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
    finally:
        held.release()
    assert r.returncode != 0 and "is in use by another run" in r.stderr and str(out) in r.stderr, r.stderr
    assert not [n for n in os.listdir(out) if n.endswith(".tar")]


@pytest.mark.parametrize("argv, words", [
    (["--seed", "1" * 23], ["--seed", "must be at most"]),
    (["--start_epoch", "5", "--epochs", "3"], ["--start_epoch 5 is not below --epochs 3"]),
])
def test_flags_out_of_range_are_one_line(shapes, tmp_path, capsys, argv, words):
    flags = fast_flags(shapes, tmp_path / "run", epochs=1)
    if "--epochs" in argv:
        i = flags.index("--epochs")
        del flags[i:i + 2]
    with pytest.raises(SystemExit) if argv[0] == "--seed" else _no_raise():
        assert main(["train", *flags, *argv]) != 0
    _one_line(capsys, *words)
    assert not (tmp_path / "run").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_dangling_link_loop_and_too_long_paths_are_one_line(shapes, tmp_path, capsys):
    dangling = tmp_path / "out-link"
    os.symlink(tmp_path / "nowhere", dangling)
    assert main(["train", *fast_flags(shapes, dangling, epochs=1)]) != 0
    _one_line(capsys, str(dangling), "symbolic link to", "does not exist")
    loop = tmp_path / "loop.pth"
    os.symlink(loop, loop)
    too_long = str(tmp_path / ("x" * 300 + ".pth"))
    for path, words in ((str(loop), ["symbolic link"]), (too_long, ["too long"])):
        assert main(["eval", "--checkpoint", path, "--data-path", shapes, "--device", "cpu", "--model",
                     "spach_ms_xxs_patch4_224_attn", "--num_workers", "0"]) != 0
        _one_line(capsys, *words)


def test_resume_repairs_a_log_with_bytes_that_are_not_utf8(shapes, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert main(["train", *fast_flags(shapes, out, epochs=1)]) == 0
    with open(out / "log.txt", "ab") as f:
        f.write(b"\xff\xfe not a line spach wrote \x80\n")
    assert main(["train", *fast_flags(shapes, out, epochs=2)]) == 0
    lines = (out / "log.txt").read_bytes().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_plot_skips_lines_whose_epoch_is_not_a_number(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    rows = ['{"epoch": 0, "train_loss": 2.0, "test_acc1": 10}', '{"epoch": NaN, "train_loss": 1.0}',
            '{"epoch": 1e400, "train_loss": 1.0}', '{"epoch": 1, "train_loss": 1.5, "test_acc1": 20}']
    (run / "log.txt").write_text("\n".join(rows) + "\n")
    assert main(["plot", str(run), "--output", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0
    assert "skipped 2 line(s)" in capsys.readouterr().err


@contextlib.contextmanager
def _tmpfs(folder, options: str):
    """A real tmpfs mounted at ``folder`` with ``options``; the test is skipped where mounting is not permitted."""
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only file system."""
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        yield folder


def test_a_read_only_output_is_one_line_before_any_work(shapes, tmp_path, capsys, read_only_folder, one_thread):
    run = tmp_path / "run"
    assert main(["train", *fast_flags(shapes, run, epochs=1)]) == 0
    capsys.readouterr()
    for fmt in ("safetensors", "torchscript", "hf"):
        out = read_only_folder / f"model.{fmt}"
        assert main(["export", "--checkpoint", str(run / "checkpoint.pth"), "--format", fmt, "--output", str(out)]) == 2
        _one_line(capsys, f"folder {read_only_folder} is on a read-only file system")
    assert main(["train", *fast_flags(shapes, read_only_folder / "run", epochs=1)]) != 0
    _one_line(capsys, "read-only file system")


def _fill(folder):
    """Fill the file system of ``folder`` to its last block."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_disk_while_taking_the_lock_leaves_no_lock_file(tmp_path):
    from spach.errors import SpachError
    with _tmpfs(tmp_path / "tiny", "size=64k") as folder:
        _fill(folder)
        with pytest.raises(SpachError, match="the disk is full"):
            OutputDirLock(str(folder)).acquire()
        assert not (folder / LOCK_NAME).exists()


def test_eval_of_an_exported_safetensors_file_uses_its_metadata(shapes, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    assert main(["train", *fast_flags(shapes, run, epochs=1)]) == 0
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(run / "checkpoint.pth"), "--format", "safetensors", "--output",
                 str(out)]) == 0
    capsys.readouterr()
    # no --model, --input-size or --crop-pct: the file's metadata names them, as a training checkpoint's args do
    assert main(["eval", "--checkpoint", str(out), "--data-path", shapes, "--device", "cpu", "--num_workers", "0"]) == 0
    assert "Creating model: spach_ms_xxs_patch4_224_attn (3 classes, input 32)" in capsys.readouterr().out


def test_a_full_disk_while_predict_writes_its_output_is_one_line_and_keeps_the_old_file(shapes, tmp_path, capsys,
                                                                                       one_thread):
    run = tmp_path / "run"
    assert main(["train", *fast_flags(shapes, run, epochs=1)]) == 0
    with _tmpfs(tmp_path / "tiny", "size=64k") as folder:
        (folder / "p.json").write_text("older results\n")
        _fill(folder)
        capsys.readouterr()
        assert main(["predict", "--checkpoint", str(run / "checkpoint.pth"), os.path.join(shapes, "val"),
                     os.path.join(shapes, "train"), "--output", str(folder / "p.json"), "-j", "0"]) == 2
        _one_line(capsys, str(folder / "p.json"), "the disk is full", "an older one is kept")
        assert (folder / "p.json").read_text() == "older results\n"
        assert sorted(os.listdir(folder)) == ["filler", "p.json"]  # no partial file left


def test_export_onto_a_disk_without_room_is_one_line_before_writing(shapes, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    assert main(["train", *fast_flags(shapes, run, epochs=1)]) == 0
    with _tmpfs(tmp_path / "small", "size=1m") as folder:
        for fmt in ("safetensors", "torchscript", "onnx", "hf"):  # TorchScript's writer would abort the process
            capsys.readouterr()
            assert main(["export", "--checkpoint", str(run / "checkpoint.pth"), "--format", fmt, "--output",
                         str(folder / f"m.{fmt}")]) == 2
            _one_line(capsys, f"{folder} has ", "MB free, and this needs about")
        assert os.listdir(folder) == []
        # a library's own write error on a full disk is recognised as the disk's doing, whatever wraps it
        from safetensors.torch import save_file
        import torch
        from spach.files import write_failure_reason
        _fill(folder)
        with pytest.raises(Exception) as caught:
            save_file({"w": torch.zeros(4096)}, str(folder / "w.safetensors"))
        assert write_failure_reason(caught.value) == "cannot be written: the disk is full"
