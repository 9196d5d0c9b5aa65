"""Runs that outlast a job: gradient accumulation at the recipe's global batch, stop signals and mid-epoch
recovery checkpoints, kill -9 with --recovery-interval, resuming on another number of processes."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from spach.cli import main
from spach.data import RASampler, ShuffleSampler
from spach.train.preemption import EXIT_PREEMPTED
from train_helpers import REPO, fast_flags, free_port, make_shapes_folder, run_spach, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ("train_fps", "train_epoch_time")  # what two identical runs may differ in


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("shapes"), n_train=32, n_val=8)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _recipe(shapes, out, *extra):
    # every source of randomness on: RandAugment, random erasing, flips, mixup/cutmix, drop-path, EMA, repeated
    # augmentation, a loader worker, per-step lr
    return ["train", *fast_flags(shapes, out, "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--hflip", "0.5",
                                 "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.1", "--model-ema",
                                 "--model-ema-decay", "0.9", "--repeated-aug", "--sched-per-step", "--deterministic",
                                 *extra, epochs=2, batch=8, workers=1)]


@pytest.fixture(scope="module")
def straight(shapes, tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)  # as the tests' own runs (one_thread): the thread count changes the rounding
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        assert main(_recipe(shapes, out)) == 0
    finally:
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env
    return out


def _log(folder):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in open(os.path.join(folder, "log.txt"))]


def assert_same_run(a, b):
    """Weights, EMA, optimizer state, every RNG state and log.txt (timings aside) are identical."""
    x, y = _load(os.path.join(a, "checkpoint.pth")), _load(os.path.join(b, "checkpoint.pth"))
    assert x["epoch"] == y["epoch"]
    for part in ("model", "model_ema"):
        assert x[part].keys() == y[part].keys()
        for k in x[part]:
            assert torch.equal(x[part][k], y[part][k]), f"{part}.{k} differs"
    for pid, st in x["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, y["optimizer"]["state"][pid][k]), f"optimizer state {pid}.{k} differs"
    for kind in ("torch",):
        assert torch.equal(x["rng"][kind], y["rng"][kind])
    assert torch.equal(x["rng"]["numpy"]["keys"], y["rng"]["numpy"]["keys"])
    assert x["rng"]["python"] == y["rng"]["python"]
    assert _log(a) == _log(b)


# SIGTERM in the middle of epoch 1; SIGUSR1 (SLURM) on the last step of epoch 0, where the recovery checkpoint
# holds a trained epoch that is not evaluated yet; SIGINT (Ctrl-C) early in epoch 1
@pytest.mark.parametrize("sig,where,step", [("term", "step:1:5", 6), ("usr1", "step:0:11", 12), ("int", "step:1:1", 2)])
def test_a_stop_signal_writes_a_recovery_checkpoint_and_the_rerun_ends_identical(
        shapes, straight, tmp_path, monkeypatch, capsys, sig, where, step):
    out = tmp_path / "run"
    monkeypatch.setenv("SPACH_FAULT_AT", f"{sig}@{where}")
    assert main(_recipe(shapes, out)) == EXIT_PREEMPTED
    text = capsys.readouterr().out
    epoch = int(where.split(":")[1])
    assert f"stopped after step {step}/12 of epoch {epoch}; the state is in {out / 'recovery.pth'}: rerun the same " \
           f"command to continue there (exit status {EXIT_PREEMPTED})" in text
    rec = _load(out / "recovery.pth")["recovery"]
    assert (rec["epoch"], rec["step"], rec["samples"]) == (epoch, step, step * 8)
    monkeypatch.delenv("SPACH_FAULT_AT")
    assert main(_recipe(shapes, out)) == 0
    text = capsys.readouterr().out
    assert f"auto resume from {out / 'recovery.pth'}" in text
    assert f"in epoch {epoch} after step {step} ({step * 8} samples of the epoch done)" in text
    assert not (out / "recovery.pth").exists()  # superseded by the epoch checkpoint
    assert_same_run(straight, out)


def test_signal_handlers_are_put_back(shapes, tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    assert main(["train", *fast_flags(shapes, tmp_path / "run", epochs=1, batch=32)]) == 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_kill_9_loses_at_most_the_recovery_interval(shapes, straight, tmp_path):
    out = tmp_path / "run"
    # SIGKILL inside step 7 of epoch 1 (no signal to answer): recovery.pth of step 6 is the newest state
    r = run_spach(*_recipe(shapes, out, "--recovery-interval", "3"), env={"SPACH_FAULT_AT": "kill@step:1:7"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _load(out / "recovery.pth")["recovery"]["step"] == 6
    r = run_spach(*_recipe(shapes, out, "--recovery-interval", "3"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"auto resume from {out / 'recovery.pth'}" in r.stdout
    assert "in epoch 1 after step 6 (48 samples of the epoch done)" in r.stdout
    assert_same_run(straight, out)


def test_kill_9_while_writing_a_recovery_checkpoint(shapes, straight, tmp_path):
    out = tmp_path / "run"
    # SIGKILL with half of epoch 1's first recovery.pth in its temp file: the epoch checkpoint is the newest state
    r = run_spach(*_recipe(shapes, out, "--recovery-interval", "3"), env={"SPACH_FAULT_AT": "kill@write:recovery.pth:1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (out / "recovery.pth").exists() and list(out.glob(".recovery.pth.*.tmp"))
    r = run_spach(*_recipe(shapes, out, "--recovery-interval", "3"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"auto resume from {out / 'checkpoint.pth'}" in r.stdout
    assert not list(out.glob(".recovery.pth.*.tmp"))  # the torn temp file went with the next write
    assert_same_run(straight, out)


def test_a_recovery_older_than_the_epoch_checkpoint_is_not_resumed(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *fast_flags(shapes, out, "--recovery-interval", "1", epochs=1, batch=16)]) == 0
    ckpt = _load(out / "checkpoint.pth")
    # what a kill between checkpoint.pth's commit and recovery.pth's removal leaves: a recovery of epoch 0
    torch.save({**ckpt, "epoch": -1, "recovery": {"epoch": 0, "step": 3, "samples": 48, "progress": [{}]}},
               out / "recovery.pth")
    capsys.readouterr()
    assert main(["train", *fast_flags(shapes, out, "--recovery-interval", "1", epochs=2, batch=16)]) == 0
    text = capsys.readouterr().out
    assert f"auto resume from {out / 'checkpoint.pth'}" in text
    assert _load(out / "checkpoint.pth")["epoch"] == 1


# --- accumulation -----------------------------------------------------------------------------------------

def _plain(shapes, out, *extra, epochs=2):
    # GroupNorm / LayerNorm model; the crops stay random (each sample's draws depend on its place in the epoch,
    # not on the batch layout), drop-path and mixup off (they draw per batch). One --lr for every layout: the
    # lr is scaled by the global batch, which the layouts share
    return ["train", *fast_flags(shapes, out, "--sched-per-step", "--deterministic", "--amp", "off", *extra,
                                 epochs=epochs,
                                 batch=32, lr=1e-3)]


def test_accumulation_and_processes_give_the_global_batchs_weights(shapes, tmp_path, capsys):
    one, acc, ddp = tmp_path / "one", tmp_path / "acc", tmp_path / "ddp"
    assert main(_plain(shapes, one)) == 0
    capsys.readouterr()
    assert main(_plain(shapes, acc, "--batch-size", "8", "--grad-accum-steps", "4")) == 0
    text = capsys.readouterr().out
    assert "global batch 32 = 8 per card x 4 accumulation x 1 card(s)" in text
    assert "lr 0.016 x global batch 32 / 512 = 0.001" in text
    r = torchrun(*_plain(shapes, ddp, "--batch-size", "8", "--global-batch", "32"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 32 = 8 per card x 2 accumulation x 2 card(s)" in r.stdout + r.stderr
    # another global batch (16: other samples per step, twice the steps) as the yardstick of a real difference
    assert main(_plain(shapes, tmp_path / "other", "--batch-size", "8", "--grad-accum-steps", "2")) == 0
    a, b, c, d = (_load(p / "checkpoint.pth")["model"] for p in (one, acc, ddp, tmp_path / "other"))

    def gap(x, y):
        return max((x[k] - y[k]).abs().max().item() for k in x if x[k].is_floating_point())
    # 6 AdamW steps at lr 1e-3 move weights by up to ~6e-3; fp32 rounding of the sums leaves ~1e-6
    assert gap(a, d) > 1e-3
    assert gap(a, b) < 1e-5, "batch 8 x 4 accumulation differs from batch 32"
    assert gap(a, c) < 1e-5, "2 processes x batch 8 x 2 accumulation differ from batch 32"
    for x, y in zip(_log(one), _log(acc)):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["train_lr"] == y["train_lr"]


def test_global_batch_that_does_not_divide_is_one_line(shapes, tmp_path, capsys):
    assert main(_plain(shapes, tmp_path / "x", "--batch-size", "8", "--global-batch", "20")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--global-batch 20 is not a multiple of --batch-size 8 x 1 process(es) = 8: pick a "
                            "--batch-size that divides 20 per process, or a --global-batch that is a multiple of 8")
    assert main(_plain(shapes, tmp_path / "x", "--batch-size", "8", "--global-batch", "32", "--grad-accum-steps",
                       "2")) == 2
    assert "means --grad-accum-steps 4" in capsys.readouterr().err


def test_samplers_continue_an_epoch_on_another_number_of_processes():
    # 2 processes x 8 for 3 steps, then 1 process x 8 x 2 accumulation (global batch 16) for the rest: every
    # position of the epoch once, in the same global batches as an uninterrupted run
    for kind in (RASampler, ShuffleSampler):
        n, g = 100, 16
        full = kind(n, 1, 0, seed=3, global_batch=g)
        full.set_epoch(4)
        order = list(full)
        before = [kind(n, 2, r, seed=3, global_batch=g) for r in range(2)]
        for s in before:
            s.set_epoch(4)
        seen = [list(s.items())[:3 * 8] for s in before]
        after = kind(n, 1, 0, seed=3, global_batch=g)
        after.set_epoch(4, start=3 * g)
        rest = list(after.items())
        positions = sorted(p for part in seen for p, _ in part) + [p for p, _ in rest]
        assert positions == list(range(n // g * g))
        indices = dict(p for part in seen for p in part) | dict(rest)
        assert [indices[p] for p in range(n // g * g)] == order
        assert len(after) == len(rest) == n // g * g - 3 * g


def test_resume_on_another_number_of_processes_and_a_changed_global_batch(shapes, tmp_path):
    out = tmp_path / "run"
    flags = _plain(shapes, out, "--batch-size", "8", "--global-batch", "16")
    # two processes; rank 1 alone gets SIGTERM in step 2 of epoch 0: both stop after the same step
    r = torchrun(*flags, env={"SPACH_FAULT_AT": "term@step:0:2", "SPACH_FAULT_RANK": "1"})
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "SIGTERM received" in text
    rec = _load(out / "recovery.pth")
    assert rec["layout"] == {"global_batch": 16, "world_size": 2, "batch_size": 8, "grad_accum_steps": 1}
    stopped = rec["recovery"]["step"]
    assert stopped in (3, 4)  # the step the flag was agreed on: the next one, on every rank

    # one process with a smaller global batch: refused in one line naming both values
    r = run_spach(*_plain(shapes, out, "--batch-size", "8"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith(
        "was trained at a global batch of 16 (8 per process x 2 process(es)); this run's is 8 (8 per process x 1 "
        "process(es)): keep 16 (e.g. --global-batch 16) to continue the same run, or add --allow-batch-change to "
        "change it deliberately (the lr is scaled to the new global batch)")

    # ... and accepted when asked: the epoch's remaining samples are cut into the new global batch
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    r = run_spach(*_plain(shapes, changed, "--batch-size", "8", "--allow-batch-change"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the global batch changes from 16 (8 per process x 2 process(es)) to 8 (8 per process x 1 process(es)) " \
           "(--allow-batch-change); the lr becomes" in r.stdout + r.stderr
    assert f"in epoch 0 after step {stopped * 2} ({stopped * 16} samples of the epoch done)" in r.stdout
    assert [row["epoch"] for row in _log(changed)] == [0, 1]

    # one process, the same global batch by accumulation: the same epoch goes on where it stopped
    r = run_spach(*flags)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming on another layout: global batch 16 = 8 per process x 2 accumulation x 1 process(es) (was 8 " \
           "per process x 2 process(es))" in r.stdout
    assert f"in epoch 0 after step {stopped} ({stopped * 16} samples of the epoch done)" in r.stdout
    log = _log(out)
    assert [row["epoch"] for row in log] == [0, 1]


def test_sigterm_to_torchrun_stops_every_rank_and_the_rerun_continues(shapes, tmp_path):
    # what a spot instance's notice or `scancel` does to a torchrun job: torchrun gets SIGTERM and passes it on
    out, log = tmp_path / "run", tmp_path / "agent.log"
    flags = _plain(shapes, out, "--batch-size", "8", "--print-freq", "1", epochs=3)
    with tempfile.TemporaryDirectory(prefix="spach-torchrun-") as tmp, open(log, "w") as sink:
        env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=tmp)
        agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                  "--master_port", str(free_port()), "-m", "spach", *flags], cwd=REPO, env=env,
                                 stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while "Epoch: [0]  [2/6]" not in log.read_text() and agent.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=120)
        finally:
            if agent.poll() is None:
                agent.kill()
    text = log.read_text()
    assert text.count("SIGTERM received: stopping after the current step") == 2  # both workers got it
    stopped = re.search(r"SIGTERM: stopped (after step (\d+)/6 of epoch (\d+)|at the end of epoch (\d+)); the "
                        r"state is in (\S+): rerun the same command", text)
    assert stopped, text[-3000:]
    r = torchrun(*flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"auto resume from {stopped.group(5)}" in r.stdout + r.stderr
    assert [row["epoch"] for row in _log(out)] == [0, 1, 2]


@pytest.mark.parametrize("name", ["recovery.pth", "checkpoint_hist.json"])
def test_a_link_at_a_long_run_file_is_refused(shapes, tmp_path, capsys, name):
    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "users_file"
    target.write_bytes(b"keep me")
    os.symlink(target, out / name)
    assert main(["train", *fast_flags(shapes, out, "--recovery-interval", "1", "--checkpoint-hist", "2", epochs=1,
                                      batch=32)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"{out / name} is a symbolic link: spach writes its own files only where it made them; remove the link (or "
        f"pass another --output_dir)")
    assert target.read_bytes() == b"keep me"


@pytest.mark.parametrize("damage,expected", [
    (lambda rec: rec["progress"][0].update(loss_sum="1.5"), "has a malformed 'recovery' entry (a progress entry whose "
                                                             "counts, loss sum, lrs or time are not numbers in range)"),
    (lambda rec: rec.update(samples=-16), "has a malformed 'recovery' entry (not an epoch, step, samples and "
                                          "progress)"),
    (lambda rec: rec.update(samples=10_000, step=625), "stopped 10000 samples into epoch 1, which this data cannot "
                                                       "continue"),
], ids=["progress", "samples", "beyond-the-data"])
def test_a_damaged_recovery_checkpoint_is_one_line(shapes, tmp_path, capsys, damage, expected):
    out = tmp_path / "run"
    assert main(["train", *fast_flags(shapes, out, epochs=1, batch=16)]) == 0
    ckpt = _load(out / "checkpoint.pth")
    rec = {"epoch": 1, "step": 2, "samples": 32, "progress": [{"steps_done": 2, "loss_sum": 2.0, "lrs": [1e-3, 1e-3],
                                                                 "bad_images": 0, "elapsed": 1.0}]}
    damage(rec)
    torch.save({**ckpt, "recovery": rec}, out / "recovery.pth")  # newer than checkpoint.pth: it is resumed
    capsys.readouterr()
    assert main(["train", *fast_flags(shapes, out, epochs=2, batch=16)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in line and str(out / "recovery.pth") in line, line


def test_a_recovery_checkpoint_without_a_position_is_passed_over(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *fast_flags(shapes, out, epochs=1, batch=16)]) == 0
    torch.save({**_load(out / "checkpoint.pth"), "recovery": {"epoch": 1, "step": "3"}}, out / "recovery.pth")
    capsys.readouterr()
    assert main(["train", *fast_flags(shapes, out, epochs=2, batch=16)]) == 0
    text = capsys.readouterr()
    assert f"{out / 'recovery.pth'} has a malformed 'recovery' entry (no epoch and step): not resuming from it" in \
        text.out + text.err
    assert f"auto resume from {out / 'checkpoint.pth'}" in text.out
