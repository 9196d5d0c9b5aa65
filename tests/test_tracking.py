"""Watching a run: per-step and per-epoch metrics in TensorBoard, Weights & Biases (offline) and a real MLflow
server on localhost, read back with each library's own reader; a resumed run continues the same tracked run."""
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from spach.cli import main
from train_helpers import fast_flags, make_shapes_folder

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 classes x 32 images / batch 16 = 6 optimizer steps an epoch; --log-interval 2 -> 3 logged steps an epoch
STEPS, LOGGED = 6, 3


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("track_shapes"))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_tensorboard_per_step_and_per_epoch_and_progress_eta(shapes, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    assert main(["train", *fast_flags(shapes, out, "--tensorboard", "--log-interval", "2",
                                      "--log-grad-norm", epochs=2)]) == 0
    log = capsys.readouterr().out.splitlines()
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/loss", "step/lr", "step/images_per_s", "step/grad_norm", "train/loss", "test/acc1"} <= tags
    # the global step counts optimizer steps since the start: 2, 4, 6 then 8, 10, 12
    assert [e.step for e in acc.Scalars("step/loss")] == [2, 4, 6, 8, 10, 12]
    assert all(e.value > 0 for e in acc.Scalars("step/grad_norm"))
    assert [e.step for e in acc.Scalars("test/acc1")] == [0, 1]
    # every progress line names step / steps, images/s and the ETA of the epoch and of the run
    lines = [x for x in log if re.match(r"Epoch: \[\d\]  \[\d/6\]", x)]
    assert len(lines) == 4 and all(
        re.search(r"images/s: [0-9.]+  eta: \d\d:\d\d:\d\d \(epoch\) \d\d:\d\d:\d\d \(run\)", x) for x in lines), lines
    assert any(re.search(r"eta: \d\d:\d\d:\d\d \(1 epochs left\)", x) for x in log)


class _Broken:
    name = "Broken"
    calls = 0

    def log_step(self, step, metrics):
        _Broken.calls += 1
        raise OSError("No space left on device")

    log_epoch = log_step

    def close(self, failed=False):
        pass


def test_a_failing_sink_warns_once_and_the_others_go_on(caplog):
    from spach.train.metrics import Metrics

    class Keep:
        name = "Keep"

        def __init__(self):
            self.steps = []

        def log_step(self, step, metrics):
            self.steps.append((step, metrics))

        def log_epoch(self, epoch, step, metrics):
            pass

        def close(self, failed=False):
            pass

    keep = Keep()
    m = Metrics([_Broken(), keep])
    with caplog.at_level("WARNING", logger="spach.train"):
        for s in range(3):
            m.log_step(s, {"loss": 1.0, "note": "text", "bad": float("nan")})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "Broken logging failed" in warnings[0] and "No space left" in warnings[0]
    assert _Broken.calls == 1 and keep.steps == [(0, {"loss": 1.0}), (1, {"loss": 1.0}), (2, {"loss": 1.0})]


def test_missing_extra_is_one_line_naming_it(shapes, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    rc = main(["train", *fast_flags(shapes, tmp_path / "x", "--mlflow-uri", "http://127.0.0.1:9")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["spach: error: --mlflow-uri needs the mlflow package: pip install 'spach[mlflow]'"]
    assert not (tmp_path / "x").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", f"file://{root}/artifacts", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
        # no background job workers (mlflow 3 starts a dozen): this test needs the tracking API only
        env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(uri + "/health", timeout=2).status == 200:
                    break
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield uri
    finally:  # the server and its workers are one process group, started here
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)  # a graceful stop waits on the client's kept-alive connections: no need
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_mlflow_server_params_metrics_artifacts_and_resume(shapes, tmp_path, mlflow_server):
    from mlflow import MlflowClient
    out = tmp_path / "mlf"
    flags = fast_flags(shapes, out, "--mlflow-uri", mlflow_server, "--mlflow-experiment", "shapes",
                       "--mlflow-run-name", "tiny", "--mlflow-log-best", "--log-interval", "2", epochs=1)
    assert main(["train", *flags]) == 0
    run_id = _load(out / "checkpoint.pth")["tracking"]["mlflow"]
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    # the params are the run's resolved configuration (the checkpoint's args)
    assert run.data.params["model"] == "spach_ms_xxs_patch4_224_attn" and run.data.params["epochs"] == "1"
    assert run.data.params["log_interval"] == "2" and run.data.params["batch_size"] == "16"
    # the resume: two more epochs into the same run, its step axis continuing
    flags[flags.index("--epochs") + 1] = "3"
    assert main(["train", *flags]) == 0
    assert _load(out / "checkpoint.pth")["tracking"]["mlflow"] == run_id
    history = client.get_metric_history(run_id, "step/loss")
    assert [m.step for m in history] == [2 * (k + 1) for k in range(3 * LOGGED)]
    assert [m.step for m in client.get_metric_history(run_id, "test/acc1")] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert [m.value for m in client.get_metric_history(run_id, "epoch")] == [0, 1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert {"config.yaml", "log.txt", "best.pth"} <= {a.path for a in client.list_artifacts(run_id)}
    logged = client.download_artifacts(run_id, "log.txt", str(tmp_path))
    assert len(open(logged).read().splitlines()) == 3
    # a run that stops on an error (here a loss blown up by an absurd lr) marks its tracked run failed
    flags[flags.index("--epochs") + 1], flags[flags.index("--lr") + 1] = "4", "1e12"
    assert main(["train", *flags]) == 2
    assert client.get_run(run_id).info.status == "FAILED"


def test_mlflow_server_down_warns_once_and_training_goes_on(shapes, tmp_path, capsys):
    pytest.importorskip("mlflow")
    out = tmp_path / "down"
    assert main(["train", *fast_flags(shapes, out, "--mlflow-uri", f"http://127.0.0.1:{_free_port()}",
                                      epochs=1)]) == 0
    captured = capsys.readouterr()
    warnings = [x for x in (captured.out + captured.err).splitlines() if "MLflow" in x or "Retrying" in x]
    assert len(warnings) == 1 and "training goes on" in warnings[0], warnings
    assert (out / "checkpoint.pth").is_file() and len((out / "log.txt").read_text().splitlines()) == 1


def _wandb_records(path):
    """The records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic, version),
    then LevelDB-log blocks of 32 KiB whose chunks (crc, length, kind: full / first / middle / last) hold
    wandb's own protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_run_and_resume_continue_the_same_run(shapes, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no login: the run must go offline by itself
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "wb"
    flags = fast_flags(shapes, out, "--log-wandb", "--wandb-project", "shapes", "--wandb-name", "tiny",
                       "--wandb-tags", "a,b", "--log-interval", "3", epochs=1)
    assert main(["train", *flags]) == 0
    run_id = _load(out / "checkpoint.pth")["tracking"]["wandb"]
    flags[flags.index("--epochs") + 1] = "2"
    assert main(["train", *flags]) == 0
    assert _load(out / "checkpoint.pth")["tracking"]["wandb"] == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    # read both offline runs back from wandb's own files: the run, its config and its history rows
    steps, epochs = [], []
    for run in runs:
        for rec in _wandb_records(next(run.glob("*.wandb"))):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                config = {item.key: json.loads(item.value_json) for item in rec.run.config.update}
                assert rec.run.run_id == run_id and list(rec.run.tags) == ["a", "b"]
                assert rec.run.display_name == "tiny" and rec.run.project == "shapes"
                assert config["model"] == "spach_ms_xxs_patch4_224_attn" and config["log_interval"] == 3
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
                if "step/loss" in row:
                    steps.append(row["global_step"])
                if "test/acc1" in row:
                    epochs.append((row["epoch"], row["global_step"]))
    assert steps == [3, 6, 9, 12]  # two logged steps an epoch, continuing across the resume
    assert epochs == [(0, STEPS), (1, 2 * STEPS)]
