"""The ModelZoo launcher scripts in test/: smoke runs on CPU with a tiny model and tiny data."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from train_helpers import REPO, TINY_MODEL, make_shapes_folder, torchrun_nodes

TEST_DIR = os.path.join(REPO, "test")
TINY = [f"--model={TINY_MODEL}", "--batch_size=16", "--input_size=32", "--device=cpu", "--num_workers=0",
        "--aa=none", "--reprob=0", "--mixup=0", "--cutmix=0", "--no-model-ema", "--no-repeated-aug", "--hflip=0",
        "--crop-pct=1", "--warmup-epochs=0", "--cooldown-epochs=0", "--drop-path=0", f"--lr={2e-3 * 512 / 16}"]
# the keys, in the order, that the Ascend ModelZoo's own test/train_full_*.sh scripts write into
# output/$ASCEND_DEVICE_ID/${CaseName}.log (their performance scripts leave TrainAccuracy out), and the lines they print
MODELZOO_KEYS = ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS", "TrainingTime",
                 "TrainAccuracy", "ActualLoss", "E2ETrainingTime"]
MODELZOO_PERF_KEYS = [k for k in MODELZOO_KEYS if k != "TrainAccuracy"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("shapes"), n_train=32, n_val=12)


@pytest.fixture
def out_id(request):
    name = f"pytest-{os.getpid()}-{request.node.name}"
    yield name
    shutil.rmtree(os.path.join(TEST_DIR, "output", name), ignore_errors=True)


def launch(script, *args, cwd=REPO, out_id="0", timeout=300, env=None):
    # torchrun leaves a torchelastic_* log folder in the temporary directory: give it one that goes afterwards
    with tempfile.TemporaryDirectory(prefix="spach-launch-") as tmp:
        env = dict(os.environ, PYTHON=sys.executable, ASCEND_DEVICE_ID=out_id, OMP_NUM_THREADS="1", TMPDIR=tmp,
                   **(env or {}))
        path = os.path.join("test", script) if cwd == REPO else script
        return subprocess.run(["bash", path, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)


def summary(out_id, case):
    text = open(os.path.join(TEST_DIR, "output", out_id, f"{case}.log")).read()
    return dict(line.split(" = ", 1) for line in text.splitlines())


def _final(stdout):
    fps = float(re.search(r"^Final Performance images/sec : ([0-9.]+)$", stdout, re.M).group(1))
    e2e = int(re.search(r"^E2E Training Duration sec : ([0-9]+)$", stdout, re.M).group(1))
    acc = re.search(r"^Final Train Accuracy : ([0-9.]+)$", stdout, re.M)
    return fps, e2e, float(acc.group(1)) if acc else None


def _step_losses(out_id, case):
    return [float(x) for x in open(os.path.join(TEST_DIR, "output", out_id, f"train_{case}_loss.txt")).read().split()]


def test_full_1p_from_the_repo_root(shapes, out_id):
    r = launch("train_full_1p.sh", f"--data_path={shapes}", *TINY, "--epochs=2", out_id=out_id)
    assert r.returncode == 0, r.stdout + r.stderr
    fps, e2e, acc = _final(r.stdout)
    assert fps > 0 and e2e > 0 and acc > 33.4  # above chance after 2 epochs
    s = summary(out_id, "SPACH_bs16_1p_acc")
    assert list(s) == MODELZOO_KEYS
    assert s["RankSize"] == "1" and s["BatchSize"] == "16" and float(s["ActualFPS"]) == fps
    assert float(s["TrainingTime"]) == pytest.approx(16 * 1 * 1000 / fps, rel=1e-3)  # ms per step
    assert float(s["TrainAccuracy"]) == acc and int(s["E2ETrainingTime"]) == e2e
    # 6 steps an epoch and --print-freq 10: each epoch logs its last step -> one loss an epoch
    losses = _step_losses(out_id, "SPACH_bs16_1p_acc")
    assert len(losses) == 2 and all(x > 0 for x in losses) and float(s["ActualLoss"]) == losses[-1]
    assert os.path.isfile(os.path.join(TEST_DIR, "output", out_id, "checkpoint.pth"))


def test_full_1p_with_accumulation_stopped_by_a_signal_then_rerun(shapes, out_id):
    args = (f"--data_path={shapes}", *TINY, "--epochs=1", "--batch_size=8", "--grad_accum_steps=2")
    # SIGTERM in step 2: spach saves recovery.pth and exits 75; the launcher says so and passes the status on
    r = launch("train_full_1p.sh", *args, out_id=out_id, env={"SPACH_FAULT_AT": "term@step:0:1"})
    assert r.returncode == 75, r.stdout + r.stderr
    assert "[Stopped] spach stopped on a signal (status 75) and saved its state; rerun the same command" in r.stdout
    assert re.search(r"^SIGTERM: stopped after step 2/6 of epoch 0; the state is in \S+recovery.pth", r.stdout, re.M)
    r = launch("train_full_1p.sh", *args, out_id=out_id)  # the same command continues
    assert r.returncode == 0, r.stdout + r.stderr
    fps, _, _ = _final(r.stdout)
    s = summary(out_id, "SPACH_bs8_1p_acc")
    assert s["BatchSize"] == "8"
    # ms per optimizer step: the global batch (8 x 2 accumulated) over the images per second
    assert float(s["TrainingTime"]) == pytest.approx(16 * 1000 / fps, rel=1e-3)


def test_performance_1p_from_the_test_folder_runs_one_epoch(shapes, out_id):
    r = launch("train_performance_1p.sh", f"--data_path={shapes}", *TINY, cwd=TEST_DIR, out_id=out_id)
    assert r.returncode == 0, r.stdout + r.stderr
    fps, _, acc = _final(r.stdout)
    log = open(os.path.join(TEST_DIR, "output", out_id, f"train_{out_id}.log")).read()
    assert "Epoch: [0]" in log and "Epoch: [1]" not in log
    s = summary(out_id, "SPACH_bs16_1p_perf")
    assert list(s) == MODELZOO_PERF_KEYS and acc is None
    assert s["ActualFPS"] == f"{fps:.2f}" and float(s["ActualLoss"]) == _step_losses(out_id, "SPACH_bs16_1p_perf")[-1]


def test_full_8p_adapts_to_one_process(shapes, out_id):
    r = launch("train_full_8p.sh", f"--data_path={shapes}", *TINY, "--epochs=1", "--nproc=1", out_id=out_id)
    assert r.returncode == 0, r.stdout + r.stderr
    assert summary(out_id, "SPACH_bs16_1p_acc")["RankSize"] == "1"


def test_performance_8p_on_two_processes_then_eval_8p(shapes, out_id):
    r = launch("train_performance_8p.sh", f"--data_path={shapes}", *TINY, "--epochs=2", "--nproc=2", out_id=out_id)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torch.distributed.run --nproc_per_node 2" in r.stdout
    if shutil.which("numactl") and shutil.which("lscpu"):
        assert "bind_rank.sh" in r.stdout  # each rank bound to its share of the cores
    s = summary(out_id, "SPACH_bs16_2p_perf")
    assert s["RankSize"] == "2" and float(s["ActualFPS"]) > 0
    assert float(s["TrainingTime"]) == pytest.approx(16 * 2 * 1000 / float(s["ActualFPS"]), rel=1e-3)
    log = open(os.path.join(TEST_DIR, "output", out_id, f"train_{out_id}.log")).read()
    assert "world_size: 2" in log and "Epoch: [1]" in log
    last_acc = re.findall(r"Accuracy of the network on the 36 test images: ([0-9.]+)%", log)[-1]

    ckpt = os.path.join(TEST_DIR, "output", out_id, "checkpoint.pth")
    r = launch("train_eval_8p.sh", f"--data_path={shapes}", f"--resume={ckpt}", "--nproc=2", "--device=cpu",
               "--num_workers=0", "--batch_size=16", out_id=out_id)
    assert r.returncode == 0, r.stdout + r.stderr
    acc = float(re.search(r"^ActualAccuracy = ([0-9.]+)$", r.stdout, re.M).group(1))
    assert re.search(r"^E2E Eval Duration sec : [0-9]+$", r.stdout, re.M)
    assert acc == pytest.approx(float(last_acc))  # dist-eval of the checkpoint = the accuracy training reported
    s = summary(out_id, "SPACH_bs16_2p_eval")
    assert float(s["ActualAccuracy"]) == acc and "E2EEvalTime" in s


def test_full_8p_as_two_nodes_on_one_host(shapes, out_id):
    """The multi-node flags: node 0 and node 1 of a two-machine job (one process each) started on this host at
    the same time, node 0 by flags and node 1 by the NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT environment. Node 0
    runs rank 0: it logs the run and prints and writes the summary, once; node 1 keeps its own log."""
    script = os.path.join("test", "train_full_8p.sh")
    common = [f"--data_path={shapes}", *TINY, "--epochs=1", "--nproc=1"]

    def node(rank, port):
        if rank == 0:
            return ["bash", script, *common, "--nnodes=2", "--node_rank=0", "--master_addr=127.0.0.1",
                    f"--master_port={port}"]
        return ["env", "NNODES=2", "NODE_RANK=1", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}",
                "bash", script, *common]

    n0, n1 = torchrun_nodes(launcher=node, env={"PYTHON": sys.executable, "ASCEND_DEVICE_ID": out_id})
    assert n0.returncode == 0 and n1.returncode == 0, n0.stdout + n0.stderr + n1.stdout + n1.stderr
    assert "--nproc_per_node 1 --nnodes 2 --node_rank 0 --master_addr 127.0.0.1" in n0.stdout
    assert "--nproc_per_node 1 --nnodes 2 --node_rank 1 --master_addr 127.0.0.1" in n1.stdout
    out = os.path.join(TEST_DIR, "output", out_id)
    both = n0.stdout + n1.stdout
    assert both.count("Final result") == 1 and both.count("Final Performance images/sec") == 1
    assert "Final Train Accuracy" in n0.stdout and "rank 0's node prints the result" in n1.stdout
    s = summary(out_id, "SPACH_bs16_2p_acc")
    assert list(s) == MODELZOO_KEYS and s["RankSize"] == "2" and float(s["ActualFPS"]) > 0
    log0 = open(os.path.join(out, f"train_{out_id}.log")).read()
    assert "world_size: 2" in log0 and log0.count("Averaged stats:") == 1
    log1 = open(os.path.join(out, f"train_{out_id}_node1.log")).read()  # node 0's log is not written over
    assert "Epoch: [0]" not in log1 and "Averaged stats:" not in log1
    assert sorted(f for f in os.listdir(out) if f.endswith("_acc.log")) == ["SPACH_bs16_2p_acc.log"]
    assert os.path.isfile(os.path.join(out, "checkpoint.pth"))


def test_multinode_flags_are_checked(out_id):
    r = launch("train_full_8p.sh", "--data_path=/tmp", "--world_size=2", out_id=out_id)
    assert r.returncode == 1 and "--nnodes=N" in r.stdout
    r = launch("train_full_8p.sh", "--data_path=/tmp", "--nnodes=2", "--node_rank=2", out_id=out_id)
    assert r.returncode == 1 and "node ranks go from 0 to nnodes - 1" in r.stdout


def test_missing_data_path_is_an_error(out_id):
    r = launch("train_full_1p.sh", "--model=x", out_id=out_id)
    assert r.returncode == 1 and "data_path" in r.stdout
    r = launch("train_eval_8p.sh", "--data_path=/tmp", out_id=out_id)
    assert r.returncode == 1 and "resume" in r.stdout


def test_log_parsers_read_by_key_not_column():
    log = "\n".join([
        "Epoch: [0]  steps: 10  lr: 0.000100  loss: 2.5000  time: 1.0s  FPS: 100.00",
        "Epoch: [0]  [ 5/10]  lr: 0.0001  loss: 2.6  images/s: 9.0  eta: 00:00:01 (epoch)  time: 0.5s",
        "Epoch: [0]  [10/10]  lr: 0.0001  loss: 2.4  time: 1.0s",  # progress line: no FPS
        "Epoch: [1]  steps: 10  extra: column  lr: 0.000100  loss: 1.5000  time: 1.0s  FPS: 300.00",
        "Averaged stats: lr: 0.000100  loss: 2.5000  FPS: 100.00  world_size: 8",
        "Averaged stats: lr: 0.000100  loss: 1.2500  FPS: 300.00  world_size: 8  new_key: 1",
        "Accuracy of the network on the 50000 test images: 70.1%",
        "Max accuracy: 70.10%",
        "Accuracy of the EMA model on the 50000 test images: 99.0%",
        "Accuracy of the network on the 50000 test images: 69.5%",
        "Max accuracy: 70.10%",
    ]) + "\n"
    script = f"source {TEST_DIR}/common.sh\n" + "\n".join(
        f"spach_parse_{f} <<'EOF'\n{log}EOF\n" for f in ("fps", "step_losses", "max_accuracy", "accuracy"))
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True).stdout.split()
    assert out == ["200.00", "2.6", "2.4", "70.10", "69.50"]


@pytest.mark.skipif(not shutil.which("numactl"), reason="numactl not installed")
def test_bind_rank_gives_each_rank_its_share_of_the_cores():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    for rank in (0, 1):
        env = dict(os.environ, SPACH_CPU_LIST=",".join(map(str, cpus[:2])), LOCAL_WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env.pop("OMP_NUM_THREADS", None)
        r = subprocess.run(["bash", os.path.join(TEST_DIR, "bind_rank.sh"), "bash", "-c",
                            "echo $OMP_NUM_THREADS; grep Cpus_allowed_list /proc/self/status"],
                           env=env, capture_output=True, text=True)
        threads, allowed = r.stdout.split("\n")[:2]
        assert threads == "1" and allowed.split()[-1] == str(cpus[rank])
