"""What a careless or hostile user still tries (docs/RELIABILITY.md, sections 8-13): two runs on one output
folder, links and special files in a dataset, a checkpoint of another run, untrusted checkpoint metadata and
fields, out-of-range flags, and the messages those get. Runs are real processes forked from the fork server
of test_reliability (torch already imported); the checks that need no training run in this process."""
import json
import os
import signal
import socket
import subprocess
import time

import pytest
import torch
from PIL import Image

from spach.cli import main
from test_reliability import MODEL, assert_one_line_error, flags, load, spach, start
from train_helpers import make_shapes_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("hostile") / "shapes", n_train=8, n_val=4)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 1-epoch run: (output folder, its checkpoint.pth)."""
    root = tmp_path_factory.mktemp("trained")
    out = str(root / "run")
    run = spach(flags(data, out, epochs=1), root)
    assert run.rc == 0, run.err
    return out, os.path.join(out, "checkpoint.pth")


def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


# ------------------------------------------------------------------------------------------------------------
# 8. one owner per output folder

def test_second_run_on_the_folder_is_refused_and_a_killed_runs_lock_never_blocks_a_resume(data, tmp_path):
    out = str(tmp_path / "run")
    first = start(flags(data, out, epochs=2), tmp_path, env={"SPACH_FAULT_AT": "stop@epoch:1"})
    try:
        first.wait_stopped()  # epoch 0 saved, the run holds the folder
        before = open(os.path.join(out, "checkpoint.pth"), "rb").read()
        log_before = open(os.path.join(out, "log.txt")).read()
        t0 = time.time()
        other = spach(flags(data, out, "--lr", "0.05", epochs=3), tmp_path)  # other flags, same folder
        assert time.time() - t0 < 60
        assert_one_line_error(other, out, "in use by another run", f"pid {first.pid}", socket.gethostname(),
                              "--output_dir")
        assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == before  # nothing of the first run touched
        assert open(os.path.join(out, "log.txt")).read() == log_before
        os.kill(first.pid, signal.SIGKILL)  # the owner dies without releasing its lock
        first.wait()
    finally:
        if first.proc.exitcode is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
    again = spach(flags(data, out, epochs=2), tmp_path)
    assert again.rc == 0, again.err
    assert "taking over the lock" in again.out and "no longer runs" in again.out
    assert "at epoch 1" in again.out  # resumed
    assert load(os.path.join(out, "checkpoint.pth"))["epoch"] == 1
    assert not os.path.exists(os.path.join(out, ".spach.lock"))  # released at the end


def _write_record(path, **fields):
    record = {"host": "node-17", "boot_id": "x", "pid": 4242, "start_ticks": 1, "started": "2026-01-01 00:00:00 UTC"}
    record.update(fields)
    with open(path, "w") as f:
        json.dump(record, f)


def test_lock_judges_other_hosts_by_heartbeat_and_this_host_by_pid(tmp_path):
    from spach.errors import SpachError
    from spach.train.output_lock import LOCK_NAME, STALE_S, OutputDirLock, _boot_id, _start_ticks
    path = tmp_path / LOCK_NAME
    # another host's lock with a fresh heartbeat: refused, naming that host and pid (a shared folder on a file
    # system whose record locks do not reach across hosts)
    _write_record(path)
    with pytest.raises(SpachError, match=r"in use by another run \(host node-17, pid 4242.*heartbeat"):
        OutputDirLock(str(tmp_path)).acquire()
    # its heartbeat stopped (a crashed node): taken over
    old = time.time() - STALE_S - 30
    os.utime(path, (old, old))
    lock = OutputDirLock(str(tmp_path)).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
    # this host: a live process with the recorded start time holds it even where locks are not enforced
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        for _ in range(50):
            if _start_ticks(sleeper.pid) is not None:
                break
            time.sleep(0.01)
        me = dict(host=socket.gethostname(), boot_id=_boot_id(), pid=sleeper.pid)
        _write_record(path, start_ticks=_start_ticks(sleeper.pid), **me)
        with pytest.raises(SpachError, match=f"pid {sleeper.pid}"):
            OutputDirLock(str(tmp_path)).acquire()
        # the same pid with another start time is a reused pid, and a record from before a reboot is stale
        for stale in (dict(me, start_ticks=_start_ticks(sleeper.pid) + 1), dict(me, boot_id="before-reboot")):
            _write_record(path, **stale)
            OutputDirLock(str(tmp_path)).acquire().release()
    finally:
        sleeper.kill()
        sleeper.wait()
    path.write_text('{"host": "node-17", "pi')  # a record torn by a crash mid-write
    OutputDirLock(str(tmp_path)).acquire().release()


# ------------------------------------------------------------------------------------------------------------
# 9. links and special files in a dataset

def test_scan_never_follows_a_link_out_of_its_class_or_around_a_cycle(data, tmp_path, caplog):
    from spach.data.folder import check_dataset
    root = tmp_path / "d"
    make_shapes_folder(root, n_train=4, n_val=2)
    train = root / "train"
    os.symlink("../", train / "circle" / "loop")                          # the loop: back up to train/
    os.symlink("../cross", train / "circle" / "cross_too")                 # a link to another class folder
    (train / "circle" / "nested").mkdir()
    os.symlink("..", train / "circle" / "nested" / "up")                  # a cycle inside the class folder
    os.symlink("../square/square_000.png", train / "cross" / "stolen.png")  # another class's image
    os.symlink("circle_001.png", train / "circle" / "again.png")           # the same image twice in one class
    os.symlink("missing.png", train / "circle" / "broken.png")
    os.mkfifo(train / "square" / "pipe.jpg")                               # never opened (it would block)
    if os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", train / "square" / "zero.jpg")
    with caplog.at_level("WARNING", logger="spach.data"):
        classes, samples = check_dataset(str(root))
    train_samples = samples["train"]
    assert len(train_samples) == 12  # 4 real images per class, nothing more
    labels = {}
    for path, label in train_samples:
        real = os.path.realpath(path)
        assert labels.setdefault(real, label) == label  # one label per image
        assert os.path.basename(os.path.dirname(real)) == classes[label]  # the label of the folder it lives in
    assert len(labels) == 12
    said = caplog.text
    for words in ("folder links leading out of their class folder", "links to another class's folder",
                  "folder links to a folder already scanned", "links to another class's image", "broken links",
                  "special files named like images", "counted once"):
        assert words in said, (words, said)


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path):
    from spach.data.folder import check_dataset
    from spach.errors import DataError
    root = tmp_path / "d"
    make_shapes_folder(root, n_train=2, n_val=2)
    for split in ("train", "val"):
        os.symlink("circle", root / split / "disc")
    with pytest.raises(DataError, match="are the same folder"):
        check_dataset(str(root))


def test_no_command_blocks_on_a_fifo(data, trained, tmp_path):
    out, ckpt = trained
    fifo = str(tmp_path / "x.jpg")
    os.mkfifo(fifo)
    fifo_ckpt = str(tmp_path / "x.pth")
    os.mkfifo(fifo_ckpt)
    cases = [
        (["predict", "--checkpoint", ckpt, fifo], ["image", fifo, "FIFO"]),
        (["predict", "--checkpoint", fifo_ckpt, str(tmp_path / "none.jpg")], [fifo_ckpt, "FIFO"]),
        (["eval", "--checkpoint", fifo_ckpt, "--data-path", data, "--device", "cpu"], [fifo_ckpt, "FIFO"]),
        (["export", "--checkpoint", fifo_ckpt, "--format", "safetensors"], [fifo_ckpt, "FIFO"]),
        (["export", "--checkpoint", ckpt, "--format", "safetensors", "--output", fifo], [fifo, "FIFO"]),
        (flags(data, str(tmp_path / "o"), "--resume", fifo_ckpt, epochs=1), [fifo_ckpt, "FIFO"]),
    ]
    for argv, words in cases:
        run = spach(argv, tmp_path, timeout=60)  # a block would fail here, not hang the suite
        assert_one_line_error(run, *words)


# ------------------------------------------------------------------------------------------------------------
# 10. a resume continues the same run

def test_resume_of_another_run_is_refused_saying_what_differs(data, trained, tmp_path):
    out, ckpt = trained
    before = open(ckpt, "rb").read()
    other_data = make_shapes_folder(tmp_path / "other", n_train=8, n_val=4, classes=("ant", "bee", "cow"))
    cases = [
        # the case: the same command with --data-path on another dataset of as many classes
        (flags(other_data, out, epochs=2), ["belongs to another run", "other classes", "ant, bee, cow",
                                            "--finetune", "--output_dir"]),
        (flags(data, out, "--model", "spach_ms_xxs_patch4_224_attn", epochs=2),
         ["belongs to another run", f"--model {MODEL} in the checkpoint", "spach_ms_xxs_patch4_224_attn now"]),
        (flags(data, out, "--input-size", "64", epochs=2), ["--input-size 32 in the checkpoint, 64 now"]),
        (flags(data, out, "--opt", "sgd", epochs=2), ["--opt adamw in the checkpoint, sgd now"]),
        # a finished run of another dataset does not say "nothing to train"
        (flags(other_data, out, epochs=1), ["belongs to another run"]),
        (flags(other_data, str(tmp_path / "new"), "--resume", ckpt, epochs=2),
         ["--resume", "checkpoint of another run", "--finetune"]),
    ]
    for argv, words in cases:
        run = spach(argv, tmp_path)
        assert_one_line_error(run, ckpt, *words)
        assert run.rc == 2
    assert open(ckpt, "rb").read() == before
    assert not os.path.exists(tmp_path / "new")  # a refused resume creates no folder
    ok = spach(flags(data, out, "--lr", "0.05", epochs=2), tmp_path)  # flags a resume may change
    assert ok.rc == 0 and "at epoch 1" in ok.out, ok.err


# ------------------------------------------------------------------------------------------------------------
# 11. checkpoint metadata and fields are untrusted

def _edited(ckpt, folder, name, edit):
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    edit(ck)
    path = os.path.join(folder, name)
    torch.save(ck, path)
    return path


def test_absurd_stored_args_are_refused_by_eval_predict_and_export(data, trained, tmp_path, capsys):
    out, ckpt = trained
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(image)
    edits = {
        "input_size": (lambda c: c["args"].update(input_size=10 ** 6), "stored input_size 1000000"),
        "crop_pct": (lambda c: c["args"].update(crop_pct=7.0), "stored crop_pct 7.0"),
        "model": (lambda c: c["args"].update(model="../../etc/passwd"), "stored model"),
        "class_names": (lambda c: c.update(class_names=[1, 2, 3]), "stored class_names"),
    }
    for name, (edit, words) in edits.items():
        bad = _edited(ckpt, str(tmp_path), f"{name}.pth", edit)
        for argv in (["eval", "--checkpoint", bad, "--data-path", data, "--device", "cpu"],
                     ["predict", "--checkpoint", bad, str(image)],
                     ["export", "--checkpoint", bad, "--format", "safetensors", "--output", str(tmp_path / "x.st")]):
            if name == "class_names" and argv[0] == "eval":
                continue  # eval reads the stored args only
            rc = main(argv)
            err = capsys.readouterr().err
            assert rc == 2 and err.count("\n") == 1 and words in err and "damaged" in err, (name, argv[0], err)


def test_malformed_fields_of_a_valid_checkpoint_are_one_line_on_resume(data, trained, tmp_path):
    out, ckpt = trained
    edits = {
        "rng": lambda c: c.update(rng={"torch": torch.zeros(3)}, rng_per_rank=None),
        "optimizer": lambda c: c.update(optimizer=[1, 2]),
        "optimizer-shape": lambda c: c["optimizer"]["param_groups"][0].update(params=[0]),
        "max_accuracy": lambda c: c.update(max_accuracy=float("nan")),
        "epoch": lambda c: c.update(epoch=-5),
        "model_ema": lambda c: c.update(model_ema="x"),
        "log_stats": lambda c: c.update(log_stats=[1]),
    }
    for name, edit in edits.items():
        folder = tmp_path / name
        folder.mkdir()
        _edited(ckpt, str(folder), "checkpoint.pth", edit)
        run = spach(flags(data, str(folder), epochs=2), tmp_path)
        field = name.split("-")[0]
        assert_one_line_error(run, str(folder / "checkpoint.pth"), field)


# ------------------------------------------------------------------------------------------------------------
# 12. flags: one line, exit 2, before anything is built or written

@pytest.mark.parametrize("extra,words", [
    (["--aa", "rand-m9-xx"], ["--aa", "unknown section 'xx'"]),
    (["--aa", "foo"], ["--aa", "unknown policy 'foo'"]),
    (["--reprob", "1.5"], ["--reprob", "[0, 1]"]),
    (["--hflip", "-0.5"], ["--hflip"]),
    (["--drop-path", "1"], ["--drop-path"]),
    (["--smoothing", "nan"], ["--smoothing", "finite"]),
    (["--crop-pct", "2"], ["--crop-pct"]),
    (["--mixup-prob", "3"], ["--mixup-prob"]),
    (["--model-ema-decay", "1.5"], ["--model-ema-decay"]),
    (["--momentum", "-1"], ["--momentum"]),
    (["--input-size", "100000"], ["--input-size", "at most"]),
    (["--recount", "0"], ["--recount"]),
    (["--remode", "pixels"], ["--remode", "invalid choice"]),
    (["--train-interpolation", "cubic"], ["--train-interpolation", "invalid choice"]),
    (["--warmup-epochs", "inf"], ["--warmup-epochs", "finite"]),
    (["--start_epoch", "-1"], ["--start_epoch"]),
    (["--opt-betas", "0.9"], ["--opt-betas", "two numbers"]),
    (["--cutmix-minmax", "0.8", "0.2"], ["--cutmix-minmax"]),
])
def test_every_flag_range_is_checked_before_anything_is_written(data, tmp_path, capsys, extra, words):
    out = tmp_path / "never"
    try:
        rc = main(flags(data, str(out), *extra, epochs=1))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


def test_failed_data_check_creates_no_output_folder(tmp_path, capsys):
    root = make_shapes_folder(tmp_path / "d", n_train=2, n_val=2)
    (tmp_path / "d" / "val" / "extra").mkdir()  # val's classes differ from train's
    out = tmp_path / "never"
    assert main(flags(root, str(out), epochs=1)) == 2
    assert "differ" in capsys.readouterr().err
    assert not out.exists()


def test_img_size_that_does_not_fit_names_sizes_that_do(trained, tmp_path, capsys):
    out, ckpt = trained
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 40)).save(image)
    for argv in (["predict", "--checkpoint", ckpt, "--img-size", "40", str(image)],
                 ["export", "--checkpoint", ckpt, "--img-size", "40", "--format", "safetensors",
                  "--output", str(tmp_path / "m.safetensors")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--img-size 40 does not fit" in err and "(e.g. --img-size 32 or 64)" in err, err
        assert err.count("\n") == 1


def test_decompression_bomb_given_to_predict_is_one_line(trained, tmp_path, capsys):
    out, ckpt = trained
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)  # 196 M pixels, over Pillow's limit; a 25 kB file
    assert main(["predict", "--checkpoint", ckpt, str(bomb)]) == 2
    err = capsys.readouterr().err
    assert f"image {bomb} is too large to decode safely" in err and err.count("\n") == 1


def test_killed_loader_worker_is_one_line_that_says_rerunning_resumes(data, trained, tmp_path):
    out = str(tmp_path / "run")
    assert spach(flags(data, out, epochs=1), tmp_path).rc == 0
    run = start(flags(data, out, epochs=2, workers=1), tmp_path, env={"SPACH_FAULT_AT": "stop@step:1:0"})
    run.wait_stopped()
    workers = _children(run.pid)
    assert workers, "no loader worker found"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    run.cont()
    run.wait(120)
    assert_one_line_error(run, "data loader worker died", "rerunning the same command resumes from",
                          os.path.join(out, "checkpoint.pth"))
    assert run.rc == 2


# ------------------------------------------------------------------------------------------------------------
# 13. messages that misled, and the small silent ones

def test_messages_name_what_is_really_wrong(data, trained, tmp_path, capsys):
    import pickle
    import random
    out, ckpt = trained
    (tmp_path / "folder").mkdir()
    random_bytes = tmp_path / "random.pth"
    random_bytes.write_bytes(random.Random(1).randbytes(4096))
    raw5 = tmp_path / "raw5.pth"
    raw5.write_bytes(pickle.dumps({"model": {}}, protocol=5))

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("true",))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": RunsCode()}, unsafe)
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 40)).save(image)

    def one_line(argv, *words, absent=()):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, (argv, err)
        for w in words:
            assert w in err, (w, err)
        for w in absent:
            assert w not in err, (w, err)

    one_line(["export", "--checkpoint", ckpt, "--format", "safetensors", "--output", str(tmp_path / "folder")],
             "is a folder", absent=("cannot read checkpoint",))
    one_line(["eval", "--checkpoint", str(tmp_path / "folder"), "--data-path", data, "--device", "cpu"],
             "is a folder", absent=("does not exist",))
    for path in (random_bytes, raw5):
        for cmd in (["predict", "--checkpoint", str(path), str(image)],
                    ["eval", "--checkpoint", str(path), "--data-path", data, "--device", "cpu"]):
            one_line(cmd, "cannot read checkpoint", absent=("could run code", "weights_only", "pickle protocol"))
    for cmd in (["predict", "--checkpoint", str(unsafe), str(image)],
                ["eval", "--checkpoint", str(unsafe), "--data-path", data, "--device", "cpu"]):
        one_line(cmd, "refusing to load", "posix.system", absent=("weights_only",))
    # eval --ema of a run without EMA, and eval of NaN weights: refused, not a silent result
    one_line(["eval", "--checkpoint", ckpt, "--ema", "--data-path", data, "--device", "cpu"], "has no EMA weights")
    nan = _edited(ckpt, str(tmp_path), "nan.pth",
                  lambda c: c["model"].update({k: v * float("nan") for k, v in c["model"].items()
                                               if v.is_floating_point()}))
    one_line(["eval", "--checkpoint", nan, "--data-path", data, "--device", "cpu"], "non-finite weights")


def test_valid_tiny_image_is_used_not_called_undecodable(tmp_path):
    from spach.data.folder import TolerantImageFolder
    from spach.data.transforms import build_transform
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (3, 2), (200, 10, 10)).save(tiny)
    tf = build_transform(True, 32, aa="none", reprob=0, color_jitter=0, hflip=0)
    ds = TolerantImageFolder([(str(tiny), 0)], ["a"], tf, strict=True)
    x, target, replaced = ds[0]
    assert x.shape == (3, 32, 32) and replaced == 0


def test_ema_asked_of_a_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file
    from spach.errors import CheckpointError
    from spach.models import read_state_dict
    path = tmp_path / "m.safetensors"
    save_file({"head.weight": torch.zeros(3, 4)}, str(path))
    assert set(read_state_dict(str(path))) == {"head.weight"}
    with pytest.raises(CheckpointError, match="no EMA copy"):
        read_state_dict(str(path), use_ema=True)
