"""Training survives kills, full disks, bad checkpoints, bad data and bad flags (docs/RELIABILITY.md).

Every run here is a real OS process running ``spach train`` on real files: kills are real SIGKILLs (sent by the
process to itself at a named point via ``SPACH_FAULT_AT``, see ``spach/train/faults.py``), the full disk is a
real tmpfs, permission errors come from running as an unprivileged user. To keep the suite affordable on two
cores, the processes are forked from a multiprocessing fork server that has already imported torch / timm /
spach (a fork of a clean, single-threaded process), except for the torchrun test, which starts everything
from scratch.
"""
import json
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from train_helpers import jpeg_bytes, draw_shape, make_shapes_folder

MODEL = "spach_ms_xxs_patch4_224_conv"
NOBODY = 65534

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the fork server before it imports torch
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "timm", "spach.cli", "spach.train.runner", "spach.models"])
        _CTX = ctx
    return _CTX


def _child(argv, env, log_prefix, uid):
    """Body of one run: output to files, extra environment, optionally drop root, then the real CLI."""
    multiprocessing.set_start_method("fork", force=True)  # loader workers start as under `python -m spach`
    for fd, suffix in ((1, ".out"), (2, ".err")):
        f = os.open(log_prefix + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.update(env)
    if uid is not None:
        # Load PIL's image plugins while still root: the unprivileged user may not be able to read the
        # interpreter's site-packages (a virtual environment in a private temp folder, as in CI).
        from PIL import Image
        Image.init()
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    from spach.cli import main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Run:
    def __init__(self, proc, log_prefix):
        self.proc, self.log_prefix = proc, log_prefix

    @property
    def pid(self):
        return self.proc.pid

    def wait(self, timeout=240):
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
            raise AssertionError(f"run did not finish in {timeout}s:\n{self.out}\n{self.err}")
        return self

    @property
    def rc(self):
        return self.proc.exitcode

    @property
    def out(self):
        with open(self.log_prefix + ".out") as f:
            return f.read()

    @property
    def err(self):
        with open(self.log_prefix + ".err") as f:
            return f.read()

    def wait_stopped(self, timeout=240):
        """Wait until the run has SIGSTOPped itself (a ``stop@`` fault point)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                state = "gone"
            if state == "T":
                return
            if state == "gone" or self.proc.exitcode is not None:
                self.proc.join(5)
                raise AssertionError(f"run ended (rc {self.proc.exitcode}) before stopping:\n{self.out}\n{self.err}")
            time.sleep(0.05)
        raise AssertionError("run never stopped")

    def cont(self):
        os.kill(self.pid, signal.SIGCONT)


_counter = [0]


def start(argv, log_dir, env=None, uid=None) -> Run:
    _counter[0] += 1
    prefix = os.path.join(str(log_dir), f"run{_counter[0]:03d}")
    proc = _context().Process(target=_child, args=([str(a) for a in argv], dict(env or {}), prefix, uid))
    proc.start()
    return Run(proc, prefix)


def spach(argv, log_dir, env=None, uid=None, timeout=240) -> Run:
    return start(argv, log_dir, env, uid).wait(timeout)


def flags(data, out, *extra, epochs=3, batch=8, workers=0, full=False):
    recipe = (["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
               "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9", "--repeated-aug", "--hflip", "0.5"]
              if full else
              ["--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--no-model-ema",
               "--no-repeated-aug", "--hflip", "0"])
    return ["train", "--data-path", data, "--output_dir", out, "--model", MODEL, "--input-size", "32",
            "--batch-size", str(batch), "--epochs", str(epochs), "--lr", "0.1", "--warmup-epochs", "1",
            "--cooldown-epochs", "0", "--sched-per-step", "--crop-pct", "1", "--num_workers", str(workers),
            "--device", "cpu", "--seed", "0", "--deterministic", "--print-freq", "2", *recipe, *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_one_line_error(run, *words):
    err = run.err
    assert run.rc not in (0, None) and run.rc > 0, (run.rc, err)
    assert err.count("\n") == 1 and err.endswith("\n"), f"not exactly one line on stderr:\n{err}"
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def assert_same(a, b, where="checkpoint"):
    """Exact equality of nested checkpoint contents (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def without_paths(ckpt):
    ckpt = dict(ckpt)
    ckpt["args"] = {k: v for k, v in ckpt["args"].items() if k not in ("output_dir", "resume")}
    if "log_stats" in ckpt:  # wall-clock measurements differ from run to run
        ckpt["log_stats"] = {k: v for k, v in ckpt["log_stats"].items() if "fps" not in k and "time" not in k}
    return ckpt


def log_lines(out):
    path = os.path.join(out, "log.txt")
    rows = [json.loads(line) for line in open(path).read().splitlines()] if os.path.exists(path) else []
    timing = ("fps", "time")
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    # 16 + 6 real PNGs per class; a 0755 folder, readable by the unprivileged user of the permission tests
    root = tempfile.mkdtemp(prefix="spach-reliability-")
    os.chmod(root, 0o755)
    data = make_shapes_folder(os.path.join(root, "shapes"), n_train=16, n_val=6)
    yield data
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def public_tmp():
    """A folder every user can enter (pytest's tmp_path is private to root)."""
    root = tempfile.mkdtemp(prefix="spach-reliability-")
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------
# kill -9 anywhere, rerun the same command: bit-identical end state

KILL_POINTS_TEMPLATE = [
    # (fault point, epoch of the last complete checkpoint after the kill, or None)
    ("step:0:2", None),                    # mid-step, before any checkpoint exists
    ("eval:0", None),                      # mid-evaluation
    ("eval-ema:0", None),                  # mid-evaluation of the EMA weights
    ("write:best.pth:0", None),            # half of best.pth written
    ("saved:best.pth:0", None),            # best.pth in place, checkpoint.pth not yet
    ("write:checkpoint.pth:0", None),      # half of the first checkpoint.pth written
    ("saved:checkpoint.pth:0", 0),         # checkpoint.pth in place, log line not yet written
    ("epoch:1", 0),                        # between epochs
    ("step:1:0", 0),                       # first step after a resume
    ("step:1:5", 0),                       # last step of an epoch
    ("eval:1", 0),
    ("write:checkpoint.pth:1", 0),         # mid-write over an existing checkpoint.pth
    ("step:2:3", 1),
    ("eval-ema:2", 1),
    ("write:checkpoint.pth:2", 1),
    ("saved:checkpoint.pth:2", 2),         # the final checkpoint in place, the run's last log line not yet
]


def test_kill9_at_16_points_then_rerun_ends_bit_identical(shapes, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    # every source of randomness on (RandAugment, random erasing, mixup / cutmix, drop-path, repeated
    # augmentation, EMA), a loader worker, per-step lr
    base = spach(flags(shapes, straight, full=True, workers=1), logs)
    assert base.rc == 0, base.err
    assert log_lines(straight)[0]["test_acc1"] > 0  # epoch 0 writes best.pth: its two kill points are reached

    results = []
    for point, last_complete in KILL_POINTS_TEMPLATE:
        run = spach(flags(shapes, broken, full=True, workers=1), logs, env={"SPACH_FAULT_AT": point})
        assert run.rc == -signal.SIGKILL, (point, run.rc, run.err)  # it died at exactly that point
        # nothing unreadable is ever left behind, and checkpoint.pth is the last complete one
        for name in ("checkpoint.pth", "best.pth"):
            path = os.path.join(broken, name)
            if os.path.exists(path):
                load(path)
        ck = os.path.join(broken, "checkpoint.pth")
        got = load(ck)["epoch"] if os.path.exists(ck) else None
        assert got == last_complete, (point, got, last_complete)
        if point.startswith("write:"):  # the kill really tore a file: its half-written temp file is on disk
            name = point.split(":")[1]
            torn = [f for f in os.listdir(broken) if f.startswith(f".{name}.") and f.endswith(".tmp")]
            assert len(torn) == 1, (point, os.listdir(broken))
            with pytest.raises(Exception):
                load(os.path.join(broken, torn[0]))
        results.append((point, run))

    final = spach(flags(shapes, broken, full=True, workers=1), logs)
    assert final.rc == 0, final.err
    assert "nothing to train" in final.out  # the last kill came after the final checkpoint
    # each rerun after a kill resumed from the last complete checkpoint
    for (point, _), (_, nxt) in zip(results, results[1:] + [(None, final)]):
        _, last = next(p for p in KILL_POINTS_TEMPLATE if p[0] == point)
        if last is None:
            assert "auto resume" not in nxt.out, point
        else:
            assert f"at epoch {last + 1}" in nxt.out, (point, nxt.out)

    for name in ("checkpoint.pth", "best.pth"):
        a, b = load(os.path.join(straight, name)), load(os.path.join(broken, name))
        assert_same(without_paths(a), without_paths(b), name)
    assert log_lines(straight) == log_lines(broken)
    assert not [f for f in os.listdir(broken) if f.endswith(".tmp")]  # temp files of killed writes removed


# ------------------------------------------------------------------------------------------------------------
# a checkpoint write that fails keeps the previous checkpoint, says so, and stops the run

def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True, text=True)
    return r.returncode == 0


def test_disk_full_keeps_previous_checkpoint_and_stops(shapes, tmp_path):
    disk = str(tmp_path / "disk")
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "256m"):
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    try:
        out = os.path.join(disk, "run")
        run = start(flags(shapes, out), tmp_path, env={"SPACH_FAULT_AT": "stop@epoch:1"})
        run.wait_stopped()
        good = open(os.path.join(out, "checkpoint.pth"), "rb").read()
        with open(os.path.join(disk, "filler"), "wb") as f:  # fill the disk up while the run is paused
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError as e:
                assert e.errno == 28
        run.cont()
        run.wait()
        assert_one_line_error(run, "could not write checkpoint", "No space left on device", "is kept", "Training stopped")
        assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == good
        assert load(os.path.join(out, "checkpoint.pth"))["epoch"] == 0
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
        assert [r["epoch"] for r in log_lines(out)] == [0]  # the unsaved epoch is not logged as done
        # space freed: the same command resumes and finishes
        os.remove(os.path.join(disk, "filler"))
        again = spach(flags(shapes, out), tmp_path)
        assert again.rc == 0 and "at epoch 1" in again.out, again.err
        assert load(os.path.join(out, "checkpoint.pth"))["epoch"] == 2
    finally:
        subprocess.run(["umount", "-l", disk])


def test_permission_denied_keeps_previous_checkpoint_and_stops(shapes, tmp_path, public_tmp):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the training as an unprivileged user")
    out = os.path.join(public_tmp, "run")
    os.makedirs(out)
    os.chown(out, NOBODY, NOBODY)
    env = {"SPACH_FAULT_AT": "stop@epoch:1", "HOME": public_tmp}
    run = start(flags(shapes, out), tmp_path, env=env, uid=NOBODY)
    run.wait_stopped()
    good = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    os.chmod(out, 0o555)  # the folder becomes read-only under the live run
    run.cont()
    run.wait()
    assert_one_line_error(run, "could not write checkpoint", "Permission denied", "is kept", "Training stopped")
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == good
    os.chmod(out, 0o755)


# ------------------------------------------------------------------------------------------------------------
# a corrupt or hostile checkpoint is refused, and its code never runs

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(folder, good_path):
    good = open(good_path, "rb").read()
    marker = os.path.join(folder, "code-ran")
    other = torch.nn.Linear(7, 5).state_dict()
    torch.manual_seed(0)
    cases = {
        "truncated": lambda p: open(p, "wb").write(good[: len(good) // 3]),
        # fixed seeds: one that torch reports as a bad file, two that trip its unpickler (IndexError, KeyError)
        "random-bytes-0": lambda p: open(p, "wb").write(random.Random(0).randbytes(4096)),
        "random-bytes-2": lambda p: open(p, "wb").write(random.Random(2).randbytes(4096)),
        "random-bytes-20": lambda p: open(p, "wb").write(random.Random(20).randbytes(4096)),
        "other-model": lambda p: torch.save({"model": other, "epoch": 0, "optimizer": {}}, p),
        "code-pickle": lambda p: torch.save({"model": {}, "epoch": 0, "evil": _RunsCode(marker)}, p),
        "raw-pickle": lambda p: open(p, "wb").write(pickle.dumps({"model": _RunsCode(marker)})),
    }
    return cases, marker


@pytest.mark.parametrize("mode", ["auto-resume", "--resume"])
def test_corrupt_checkpoint_is_refused_without_running_code(shapes, tmp_path, mode):
    logs = tmp_path / "logs"
    logs.mkdir()
    good_run = str(tmp_path / "good")
    assert spach(flags(shapes, good_run, epochs=1), logs).rc == 0
    cases, marker = _bad_checkpoints(str(tmp_path), os.path.join(good_run, "checkpoint.pth"))
    for name, write in cases.items():
        out = str(tmp_path / name)
        os.makedirs(out)
        bad = os.path.join(out if mode == "auto-resume" else str(tmp_path), "checkpoint.pth" if mode == "auto-resume"
                           else f"{name}.pth")
        write(bad)
        before = open(bad, "rb").read()
        extra = [] if mode == "auto-resume" else ["--resume", bad]
        run = spach(flags(shapes, out, *extra, epochs=2), logs)
        assert_one_line_error(run, bad)
        assert any(w in run.err for w in ("cannot read", "refusing", "does not fit", "lacks", "unexpected",
                                          "missing", "not a training checkpoint")), run.err
        assert not os.path.exists(marker), f"{name}: code in the checkpoint ran"
        assert open(bad, "rb").read() == before  # the refused file is left as it was
        if mode == "--resume" and name != "other-model":  # and `spach eval` of it
            run = spach(["eval", "--checkpoint", bad, "--data-path", shapes, "--device", "cpu", "--model", MODEL,
                         "--input-size", "32", "--num_workers", "0"], logs)
            assert_one_line_error(run, bad)
            assert not os.path.exists(marker), f"{name}: code in the checkpoint ran"


# ------------------------------------------------------------------------------------------------------------
# bad data

def _add_bad_files(data):
    """One truncated PNG, one zero-byte JPEG and one text file named .jpg in train/ (different classes, so no
    two are neighbours), one truncated JPEG in val/."""
    import io
    buf = io.BytesIO()
    draw_shape("circle", random.Random(1)).save(buf, format="PNG")
    bad_train = {
        os.path.join(data, "train", "circle", "circle_zz_truncated.png"): buf.getvalue()[:60],
        os.path.join(data, "train", "cross", "cross_zz_empty.jpg"): b"",
        os.path.join(data, "train", "square", "square_zz_text.jpg"): b"this is not an image\n" * 8,
    }
    bad_val = {os.path.join(data, "val", "cross", "cross_zz_truncated.jpg"):
               jpeg_bytes(draw_shape("cross", random.Random(2)))[:100]}
    for path, content in {**bad_train, **bad_val}.items():
        with open(path, "wb") as f:
            f.write(content)
    return list(bad_train), list(bad_val)


def test_bad_images_are_skipped_and_counted_or_refused_under_strict_data(tmp_path, public_tmp):
    data = make_shapes_folder(os.path.join(public_tmp, "d"), n_train=15, n_val=6)  # 45 good + 3 bad = 6 batches
    bad_train, bad_val = _add_bad_files(data)
    out = str(tmp_path / "run")
    run = spach(flags(data, out, epochs=2), tmp_path)
    assert run.rc == 0, run.err
    rows = log_lines(out)
    assert [r["train_bad_images"] for r in rows] == [3, 3]
    assert [r["test_bad_images"] for r in rows] == [1, 1]
    for path in bad_train + bad_val:
        assert f"skipping unreadable image {path}" in run.out + run.err
    assert "skipped 3 unreadable training images" in run.out + run.err

    strict = spach(flags(data, str(tmp_path / "strict"), "--strict-data", epochs=1), tmp_path)
    assert_one_line_error(strict, "cannot decode image", "--strict-data")
    assert any(p in strict.err for p in bad_train + bad_val)


def test_dataset_changing_between_epochs_does_not_stop_the_run(tmp_path, public_tmp):
    data = make_shapes_folder(os.path.join(public_tmp, "d"), n_train=16, n_val=6)
    out = str(tmp_path / "run")
    run = start(flags(data, out, epochs=3), tmp_path, env={"SPACH_FAULT_AT": "stop@epoch:1"})
    run.wait_stopped()
    gone = [os.path.join(data, "train", c, f"{c}_005.png") for c in ("circle", "cross", "square")]
    gone.append(os.path.join(data, "val", "square", "square_002.png"))
    for path in gone:
        os.remove(path)
    run.cont()
    run.wait()
    assert run.rc == 0, run.err
    rows = log_lines(out)
    assert [r["train_bad_images"] for r in rows] == [0, 3, 3]
    assert [r["test_bad_images"] for r in rows] == [0, 1, 1]
    assert "No such file or directory" in run.out + run.err


def test_unreadable_image_is_skipped_and_counted(tmp_path, public_tmp):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the training as an unprivileged user (root reads any file)")
    data = make_shapes_folder(os.path.join(public_tmp, "d"), n_train=16, n_val=6)
    locked = os.path.join(data, "train", "cross", "cross_007.png")
    os.chmod(locked, 0)
    out = os.path.join(public_tmp, "run")
    os.makedirs(out)
    os.chown(out, NOBODY, NOBODY)
    env = {"HOME": public_tmp}
    run = spach(flags(data, out, epochs=1), tmp_path, env=env, uid=NOBODY)
    assert run.rc == 0, run.err
    assert [r["train_bad_images"] for r in log_lines(out)] == [1]
    assert f"skipping unreadable image {locked} (PermissionError" in run.out + run.err

    strict_out = os.path.join(public_tmp, "strict")
    os.makedirs(strict_out)
    os.chown(strict_out, NOBODY, NOBODY)
    strict = spach(flags(data, strict_out, "--strict-data", epochs=1), tmp_path, env=env, uid=NOBODY)
    assert_one_line_error(strict, locked, "Permission denied")


# ------------------------------------------------------------------------------------------------------------
# bad flags: one line naming the problem, non-zero exit, no traceback

def test_bad_flags_give_one_line_errors(shapes, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = str(tmp_path / "o")
    cases = [
        (["--batch-size", "0"], ["--batch-size", "positive integer"]),
        (["--batch-size", "-8"], ["--batch-size", "positive integer"]),
        (["--epochs", "0"], ["--epochs", "positive integer"]),
        (["--epochs", "-3"], ["--epochs", "positive integer"]),
        (["--lr", "0"], ["--lr", "positive number"]),
        (["--lr", "-0.001"], ["--lr", "positive number"]),
        (["--lr", "nan"], ["--lr", "positive number"]),
        (["--model", "spach_ms_xxs_patch4_224_cnv"], ["spach_ms_xxs_patch4_224_cnv", "spach_ms_xxs_patch4_224_conv"]),
        (["--input-size", "40"], ["--input-size 40", "multiple of", "32"]),
        (["--input-size", "16"], ["--input-size 16", "multiple of", "32"]),
        (["--output_dir", str(a_file)], [str(a_file), "is a file"]),
    ]
    from spach.runtime.device import available_devices
    if "cuda" not in available_devices():
        cases.append((["--device", "cuda"], ["--device cuda", "CUDA"]))
    if "npu" not in available_devices():
        cases.append((["--npu"], ["--device npu", "torch_npu"]))
    for extra, words in cases:
        argv = flags(shapes, out, epochs=1)
        if extra[0] in ("--device", "--npu"):
            i = argv.index("--device")
            del argv[i:i + 2]
        run = spach([*argv, *extra], tmp_path)  # the later flag wins
        assert_one_line_error(run, *words)
        assert run.rc == 2, (extra, run.rc)
    assert not os.path.exists(os.path.join(out, "checkpoint.pth"))


# ------------------------------------------------------------------------------------------------------------
# non-finite loss

def test_non_finite_loss_names_step_lr_and_checkpoint_and_resume_works(shapes, tmp_path):
    out = str(tmp_path / "run")
    assert spach(flags(shapes, out, epochs=1), tmp_path).rc == 0
    ck = os.path.join(out, "checkpoint.pth")
    good = open(ck, "rb").read()
    blown = spach([*flags(shapes, out, epochs=2), "--lr", "1e12"], tmp_path)
    assert_one_line_error(blown, "non-finite", "epoch 1, step ", ", lr ", ck)
    assert open(ck, "rb").read() == good  # the last good checkpoint is untouched
    resumed = spach(flags(shapes, str(tmp_path / "again"), "--resume", ck, epochs=2), tmp_path)
    assert resumed.rc == 0, resumed.err
    assert f"resumed {ck} at epoch 1" in resumed.out
    assert load(os.path.join(tmp_path, "again", "checkpoint.pth"))["epoch"] == 1
    same_dir = spach(flags(shapes, out, epochs=2), tmp_path)  # or simply the original command again
    assert same_dir.rc == 0 and "at epoch 1" in same_dir.out


# ------------------------------------------------------------------------------------------------------------
# distributed: a rank killed mid-epoch; torchrun restarts the group, which resumes and finishes

def test_torchrun_restarts_the_group_after_a_rank_is_killed(shapes, tmp_path):
    out = str(tmp_path / "ddp")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    tmp = tmp_path / "tmp"  # torchrun's torchelastic_* log folder (and the killed rank's leftovers) land here
    tmp.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", SPACH_FAULT_AT="step:1:1", SPACH_FAULT_RANK="1", TMPDIR=str(tmp))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", "-m", "spach",
           *flags(shapes, out, epochs=2)[:]]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "exitcode: -9" in text and "local_rank: 1" in text, text[-4000:]  # rank 1 was SIGKILLed
    assert "auto resume from" in text and "at epoch 1" in text, text[-4000:]
    ck = load(os.path.join(out, "checkpoint.pth"))
    assert ck["epoch"] == 1 and ck["world_size"] == 2 and len(ck["rng_per_rank"]) == 2
    assert [r["epoch"] for r in log_lines(out)] == [0, 1]
