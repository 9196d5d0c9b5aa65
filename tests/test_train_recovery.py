"""Recovery and the less common training paths: kill -9 and rerun, fine-tuning, distillation."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from spach.cli import main
from train_helpers import REPO, fast_flags, make_shapes_folder, serve_folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("shapes"), n_train=32, n_val=12)


pytestmark = pytest.mark.usefixtures("one_thread")


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _cmd(shapes, out, *extra):
    flags = fast_flags(shapes, out, "--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0",
                       "--model-ema", "--model-ema-decay", "0.9", "--deterministic", *extra, epochs=3, workers=1)
    return [sys.executable, "-m", "spach", "train", *flags]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


# the SPACH test model, and ShiftViT in its BatchNorm variant (running statistics in the model and its EMA; lr
# 5e-4 as in its training test, scaled by batch / 512)
@pytest.mark.parametrize("model", [(), ("--model", "shiftvit_light_tiny", "--norm-layer", "BN", "--lr", "0.016")],
                         ids=["spach", "shiftvit-bn"])
def test_kill_9_after_a_checkpoint_then_rerun_ends_bit_identical(shapes, tmp_path, model):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = subprocess.run(_cmd(shapes, straight, *model), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr

    proc = subprocess.Popen(_cmd(shapes, killed, *model), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pth"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))  # somewhere in epoch 1 (step, eval or save)
    killed_midway = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _load(ckpt)["epoch"] in (0, 1, 2)  # whatever moment the kill hit, the checkpoint is complete

    r = subprocess.run(_cmd(shapes, killed, *model), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    if killed_midway:
        assert "auto resume from" in r.stdout
    a, b = _load(straight / "checkpoint.pth"), _load(ckpt)
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "model_ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    assert not [f for f in os.listdir(killed) if f.endswith(".tmp")]  # a killed write's temp file is cleaned up
    assert _load(killed / "best.pth")["epoch"] <= 2


def test_finetune_reinitialises_a_head_of_another_size(shapes, tmp_path, capsys):
    src = tmp_path / "src"
    assert main(["train", *fast_flags(shapes, src, epochs=1)]) == 0
    two = make_shapes_folder(tmp_path / "two", n_train=16, n_val=6, classes=("circle", "square"))
    capsys.readouterr()
    out = tmp_path / "ft"
    assert main(["train", *fast_flags(two, out, "--finetune", str(src / "checkpoint.pth"), epochs=1)]) == 0
    assert "re-initialising head.weight" in capsys.readouterr().out
    base, ft = _load(src / "checkpoint.pth")["model"], _load(out / "checkpoint.pth")["model"]
    assert ft["head.weight"].shape[0] == 2 and base["head.weight"].shape[0] == 3
    # a checkpoint of another architecture is refused with the reason
    rc = main(["train", *fast_flags(two, tmp_path / "bad", "--finetune", str(src / "checkpoint.pth"),
                                    "--model", "spach_ms_xxs_patch4_224_conv", epochs=1)])
    assert rc == 2 and "--finetune" in capsys.readouterr().err


def test_finetune_from_a_url_downloads_once_into_the_hub_cache(shapes, tmp_path, capsys, monkeypatch):
    """As the original's --finetune / --resume, an http(s) URL works: downloaded once into torch hub's cache
    (TORCH_HOME), in a folder of its own per URL; an unreachable URL is one line naming it and the fix."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    src = tmp_path / "src"
    assert main(["train", *fast_flags(shapes, src, epochs=1)]) == 0
    capsys.readouterr()
    with serve_folder(src) as base:
        url = f"{base}/checkpoint.pth"
        assert main(["train", *fast_flags(shapes, tmp_path / "ft", "--finetune", url, epochs=1)]) == 0
    cached = list((tmp_path / "torch_home" / "hub" / "checkpoints").glob("url-*/checkpoint.pth"))
    assert len(cached) == 1 and cached[0].read_bytes() == (src / "checkpoint.pth").read_bytes()
    assert not list(cached[0].parent.glob("*.partial"))
    capsys.readouterr()
    rc = main(["train", *fast_flags(shapes, tmp_path / "ft2", "--finetune", "http://127.0.0.1:9/w/checkpoint.pth",
                                    epochs=1)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "could not download http://127.0.0.1:9/w/checkpoint.pth" in err and "local path" in err


def test_distillation_with_a_timm_teacher(shapes, tmp_path, capsys):
    import timm
    teacher = timm.create_model("resnet10t", num_classes=3)
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, path)
    for kind in ("soft", "hard"):
        rc = main(["train", *fast_flags(shapes, tmp_path / kind, "--distillation-type", kind, "--teacher-model",
                                        "resnet10t", "--teacher-path", str(path), epochs=1)])
        assert rc == 0
        assert _load(tmp_path / kind / "checkpoint.pth")["args"]["distillation_type"] == kind
    capsys.readouterr()
    rc = main(["train", *fast_flags(shapes, tmp_path / "x", "--distillation-type", "hard", epochs=1)])
    assert rc == 2 and "--teacher-path" in capsys.readouterr().err
