"""spach train / spach eval on a tiny real-image dataset (CPU, seconds per test)."""
import math
import json
import os
import shutil
import sys

import pytest
import torch

from spach.cli import main
from spach.errors import CheckpointError
from train_helpers import TINY_MODEL, fast_flags, make_shapes_folder

DEIT_LOG_KEYS = {"train_lr", "train_loss", "test_loss", "test_acc1", "test_acc5", "epoch", "n_parameters"}
CKPT_KEYS = {"model", "optimizer", "lr_scheduler", "epoch", "model_ema", "scaler", "args"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("shapes"), n_train=32, n_val=12)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """One 3-epoch run shared by the tests that only read its results."""
    out = tmp_path_factory.mktemp("run")
    import io
    import contextlib
    buf = io.StringIO()
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(["train", *fast_flags(shapes, out, epochs=3)])
    finally:
        mp.undo()
        torch.set_num_threads(n)
    return rc, out, buf.getvalue()


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_tiny_run_learns_and_logs_like_deit(trained):
    rc, out, stdout = trained
    assert rc == 0
    lines = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1, 2]
    assert all(DEIT_LOG_KEYS <= set(l) for l in lines)
    assert max(l["test_acc1"] for l in lines) >= 80.0  # chance is 33%
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    # the log lines the launcher scripts parse
    assert "Epoch: [2]" in stdout and "FPS: " in stdout
    assert "Averaged stats: " in stdout and "loss: " in stdout
    assert "Accuracy of the network on the 36 test images: " in stdout
    assert "Max accuracy: " in stdout


def test_checkpoint_has_the_original_layout_plus_resume_state(trained):
    _, out, _ = trained
    ck = _load(out / "checkpoint.pth")
    assert CKPT_KEYS <= set(ck)
    assert ck["epoch"] == 2 and ck["sampler_epoch"] == 3
    assert ck["class_names"] == ["circle", "cross", "square"]
    assert ck["args"]["model"] == TINY_MODEL and ck["args"]["batch_size"] == 16
    assert {"torch", "numpy", "python"} <= set(ck["rng"])
    best = _load(out / "best.pth")
    assert best["max_accuracy"] == max(json.loads(l)["test_acc1"] for l in (out / "log.txt").read_text().splitlines())
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # no temp files left behind


def test_eval_of_saved_checkpoint_matches_training_log(trained, shapes, tmp_path, capsys):
    _, out, _ = trained
    best = _load(out / "best.pth")
    # model / input size / crop come from the checkpoint's args
    rc = main(["eval", "--checkpoint", str(out / "best.pth"), "--data-path", shapes, "--device", "cpu",
               "--num_workers", "0"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert f"* Acc@1 {best['max_accuracy']:.3f}" in stdout
    assert f"Accuracy of the network on the 36 test images: {best['max_accuracy']:.1f}%" in stdout
    # spach train --eval --resume goes through the same path
    rc = main(["train", "--eval", "--resume", str(out / "best.pth"), "--data-path", shapes, "--device", "cpu",
               "--num_workers", "0"])
    assert rc == 0 and f"* Acc@1 {best['max_accuracy']:.3f}" in capsys.readouterr().out
    # evaluation needs only val/
    val_only = tmp_path / "val_only"
    shutil.copytree(os.path.join(shapes, "val"), val_only / "val")
    rc = main(["eval", "--checkpoint", str(out / "best.pth"), "--data-path", str(val_only), "--device", "cpu",
               "--num_workers", "0"])
    assert rc == 0 and f"* Acc@1 {best['max_accuracy']:.3f}" in capsys.readouterr().out


def test_throughput_reports_images_per_second(trained, shapes, capsys):
    _, out, _ = trained
    rc = main(["train", "--throughput", "--resume", str(out / "best.pth"), "--data-path", shapes, "--device", "cpu",
               "--num_workers", "0", "--batch-size", "8"])
    assert rc == 0
    assert "throughput" in capsys.readouterr().out


def _full_recipe(shapes, out):
    # every source of randomness on: RandAugment, random erasing, mixup/cutmix, drop-path, EMA, repeated aug,
    # a loader worker, per-step lr
    return ["train", *fast_flags(shapes, out, "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8",
                                 "--cutmix", "1.0", "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9",
                                 "--repeated-aug", "--sched-per-step", "--warmup-epochs", "1", "--deterministic",
                                 "--clip-grad", "1.0",
                                 epochs=2, workers=1)]


def test_resume_after_interruption_ends_bit_identical(shapes, tmp_path, monkeypatch, capsys):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(_full_recipe(shapes, straight)) == 0

    from spach.train import runner
    real = runner.train_one_epoch

    def interrupted(*a, **kw):
        if a[2] == 1:  # epoch
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "train_one_epoch", interrupted)
    assert main(_full_recipe(shapes, broken)) == 130
    assert _load(broken / "checkpoint.pth")["epoch"] == 0
    monkeypatch.setattr(runner, "train_one_epoch", real)
    capsys.readouterr()
    assert main(_full_recipe(shapes, broken)) == 0  # the same command again continues the run
    assert "auto resume from" in capsys.readouterr().out

    a, b = _load(straight / "checkpoint.pth"), _load(broken / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 1
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), f"optimizer state {pid}.{k} differs"
    assert a["max_accuracy"] == b["max_accuracy"]


def test_rerun_of_a_finished_run_does_nothing(trained, shapes, capsys):
    _, out, _ = trained
    before = (out / "checkpoint.pth").stat().st_mtime_ns
    assert main(["train", *fast_flags(shapes, out, epochs=3)]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert (out / "checkpoint.pth").stat().st_mtime_ns == before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shapes, tmp_path, capsys):
    out = tmp_path / "nan"
    assert main(["train", *fast_flags(shapes, out, epochs=1)]) == 0
    good = _load(out / "checkpoint.pth")
    capsys.readouterr()
    # resume epoch 1 with an absurd lr: the loss blows up
    rc = main(["train", *fast_flags(shapes, out, epochs=2, lr=1e12)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "non-finite" in err and "epoch 1" in err and "step" in err and "lr" in err
    assert str(out / "checkpoint.pth") in err
    after = _load(out / "checkpoint.pth")
    assert after["epoch"] == 0
    assert all(torch.equal(good["model"][k], after["model"][k]) for k in good["model"])
    # and --resume from it works
    rc = main(["train", *fast_flags(shapes, tmp_path / "again", "--resume", str(out / "checkpoint.pth"), epochs=2)])
    assert rc == 0
    assert _load(tmp_path / "again" / "checkpoint.pth")["epoch"] == 1


def test_failed_checkpoint_write_keeps_previous_and_stops(shapes, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    assert main(["train", *fast_flags(shapes, out, epochs=1)]) == 0
    good = (out / "checkpoint.pth").read_bytes()

    def disk_full(*a, **kw):
        raise OSError(28, "No space left on device")

    from spach.train import checkpoint
    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    capsys.readouterr()
    rc = main(["train", *fast_flags(shapes, out, epochs=3)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "could not write checkpoint" in err and "No space left" in err and "is kept" in err
    assert (out / "checkpoint.pth").read_bytes() == good
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 1  # the unsaved epoch was not logged as done


def test_atomic_save_never_leaves_a_torn_file(tmp_path, monkeypatch):
    from spach.train.checkpoint import atomic_save, load_checkpoint
    path = tmp_path / "checkpoint.pth"
    atomic_save({"model": {"w": torch.ones(3)}, "epoch": 0}, str(path))

    real_save = torch.save

    def half_written(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 partial")
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(CheckpointError, match="previous .* is kept"):
        atomic_save({"model": {"w": torch.zeros(3)}, "epoch": 1}, str(path))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(str(path))["epoch"] == 0
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "positive integer"),
    (["--batch-size=-4"], "positive integer"),
    (["--epochs", "0"], "positive integer"),
    (["--lr", "0"], "positive number"),
    (["--lr=-1e-3"], "positive number"),
    (["--amp", "fp8"], "invalid choice"),
    (["--data-set", "IMAGENET"], "invalid choice"),
])
def test_bad_flag_values_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_bad_flags_give_one_line_errors(shapes, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--model", "spach_ms_xx_patch4_224_conv"], "did you mean"),
        (["--input-size", "40"], "multiple of its total stride 32"),
        (["--output_dir", str(a_file)], "is a file"),
        (["--amp", "fp16"], "not supported on cpu"),
        (["--batch-size", "1000"], "fewer than one batch"),
        (["--mixup", "0.8", "--batch-size", "15"], "even --batch-size"),
        (["--data-set", "CIFAR"], "--data-set CIFAR: spach reads ImageNet-layout folders"),
    ]
    for extra, message in cases:
        rc = main(["train", *fast_flags(shapes, tmp_path / "o", *extra)])
        err = capsys.readouterr().err
        assert rc == 2, extra
        assert message in err, (extra, err)
        assert err.count("\n") == 1 and err.startswith("spach: error: "), err


def test_missing_devices_are_named(shapes, tmp_path, capsys):
    from spach.runtime.device import available_devices
    for flag, device in ((["--device", "cuda"], "cuda"), (["--npu"], "npu")):
        if device in available_devices():
            continue
        rc = main(["train", *fast_flags(shapes, tmp_path / "o", device=None), *flag])
        err = capsys.readouterr().err
        assert rc == 2 and f"--device {device} requested" in err and "available here: " in err


def test_eval_without_checkpoint_is_an_error(shapes, capsys):
    assert main(["eval", "--data-path", shapes, "--device", "cpu"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_weight_decay_spares_norms_and_biases_but_not_layer_scale():
    import spach
    from spach.train.optim import param_groups
    model = spach.create_model(TINY_MODEL, num_classes=3, img_size=32)
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert all(p.ndim <= 1 for p in no_decay["params"])
    decayed = {names[id(p)] for p in decay["params"]}
    assert any("gamma" in n for n in decayed)  # layer-scale [1, 1, C] is decayed, as in the original
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)


def test_cosine_schedule_warmup_decay_cooldown():
    from spach.train.optim import CosineSchedule
    s = CosineSchedule(base_lr=1e-3, epochs=100, warmup_epochs=20, warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=10)
    assert s.lr_at(0) == pytest.approx(1e-6)
    assert s.lr_at(10) == pytest.approx((1e-6 + 1e-3) / 2)
    assert s.lr_at(20) < 1e-3 and s.lr_at(20) > s.lr_at(50) > s.lr_at(80) > s.lr_at(99) > 1e-5
    # timm's CosineLRScheduler (t_initial=epochs, no warm-up prefix), as in the original recipe
    assert s.lr_at(50) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert s.lr_at(25) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.25)))
    assert s.lr_at(100) == pytest.approx(1e-5) and s.lr_at(109) == pytest.approx(1e-5)  # cool-down
    per_step = CosineSchedule(1e-3, 10, 1, 1e-6, 1e-5, 0, per_step=True)
    assert per_step.time(2, 5, 10) == 2.5 and s.time(2, 5, 10) == 2.0


def test_ema_is_updated_every_step_and_evaluated(shapes, tmp_path, capsys):
    out = tmp_path / "ema"
    assert main(["train", *fast_flags(shapes, out, "--model-ema", "--model-ema-decay", "0.5", epochs=1)]) == 0
    assert "Accuracy of the EMA model on the 36 test images" in capsys.readouterr().out
    ck = _load(out / "checkpoint.pth")
    ema, model = ck["model_ema"], ck["model"]
    # the classifier starts at zero: an EMA that was never updated would still be zero
    assert ema["head.weight"].abs().sum() > 0
    assert not torch.equal(ema["head.weight"], model["head.weight"])
    assert "test_ema_acc1" in json.loads((out / "log.txt").read_text().splitlines()[0])


def test_ema_averages_shared_mixer_tensors_once_per_step():
    """--shared-spatial-func lists one mixer's tensors once per block in the state_dict; each gets one EMA step."""
    import copy
    import spach
    from spach.train.ema import ModelEma
    model = spach.create_model("spach_ms_xxs_patch4_224_mlp", num_classes=10, shared_spatial_func=True)
    ema = ModelEma(model, decay=0.9)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(1.0)
    ema.update(moved)
    for (name, p_ema), p in zip(ema.module.named_parameters(), model.parameters()):
        torch.testing.assert_close(p_ema - p, torch.full_like(p, 0.1), msg=name)
    sd = model.state_dict()
    assert len(sd) > len({t.data_ptr() for t in sd.values()})  # the layout does list shared tensors repeatedly


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4),
                    reason="fused AdamW on CPU needs torch >= 2.4")
def test_resumed_optimizer_keeps_this_runs_kernels():
    """A checkpoint written with foreach AdamW (e.g. on a CPU) resumes into fused AdamW (e.g. on a GPU) as fused,
    with its moments and step count, and the reverse; a state of another group layout is refused."""
    from spach.train.resume import with_current_kernels
    w = torch.nn.Parameter(torch.ones(4))
    writer = torch.optim.AdamW([w], lr=0.1, foreach=True)
    w.grad = torch.ones(4)
    writer.step()
    saved = writer.state_dict()
    w2 = torch.nn.Parameter(w.detach().clone())
    reader = torch.optim.AdamW([w2], lr=0.1, fused=True)
    reader.load_state_dict(with_current_kernels(saved, reader))
    group = reader.param_groups[0]
    assert group["fused"] and not group["foreach"]
    torch.testing.assert_close(reader.state[w2]["exp_avg"], writer.state[w]["exp_avg"])
    assert float(reader.state[w2]["step"]) == 1.0
    w2.grad = torch.ones(4)
    reader.step()                                           # the fused kernel runs on the loaded state
    w.grad = torch.ones(4)
    writer.step()
    torch.testing.assert_close(w2.detach(), w.detach())
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(4))], lr=0.1, fused=True)
    plain.load_state_dict(saved)
    assert not plain.param_groups[0]["fused"]  # what torch's load_state_dict alone would have done
    assert saved["param_groups"][0]["foreach"]  # and the saved state itself is left as it was
    back = torch.optim.AdamW([torch.nn.Parameter(torch.ones(4))], lr=0.1, foreach=True)
    back.load_state_dict(with_current_kernels(reader.state_dict(), back))
    assert back.param_groups[0]["foreach"] and not back.param_groups[0]["fused"]
    two = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(1))]},
                             {"params": [torch.nn.Parameter(torch.ones(1))]}], lr=0.1)
    with pytest.raises(CheckpointError, match="has 1 parameter groups, this run.s optimizer 2"):
        with_current_kernels(saved, two)


def test_device_index_is_parsed():
    from spach.errors import SpachError
    from spach.runtime.device import init_distributed, requested_index
    assert requested_index("cuda:1") == 1 and requested_index("cuda") is None and requested_index(None) is None
    with pytest.raises(SpachError, match="must be a number"):
        requested_index("cuda:first")
    assert init_distributed("cpu", index=0).device == torch.device("cpu")


def test_device_index_selects_that_gpu_in_one_process(monkeypatch):
    """`--device cuda:1` binds GPU 1 in a single process; torchrun ranks keep LOCAL_RANK. (The GPU count and
    set_device are stood in for: this machine has no GPU; the selection logic is what is checked.)"""
    from spach.errors import SpachError
    from spach.runtime import device as devices
    bound = []
    monkeypatch.setattr(devices, "device_count", lambda kind: 2)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert devices.init_distributed("cuda", index=1).device == torch.device("cuda", 1) and bound == [1]
    assert devices.init_distributed("cuda").device == torch.device("cuda", 0) and bound[-1] == 0
    with pytest.raises(SpachError, match="only 2 cuda device"):
        devices.init_distributed("cuda", index=2)


def test_channels_last_and_bf16_autocast_on_cpu(shapes, tmp_path):
    out = tmp_path / "cl"
    assert main(["train", *fast_flags(shapes, out, "--channels-last", "--amp", "bf16", epochs=1)]) == 0
    ck = _load(out / "checkpoint.pth")
    assert ck["args"]["amp"] == "bf16" and ck["args"]["channels_last"] is True
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_tensorboard_scalars_are_written_per_epoch(shapes, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from spach.cli import main
    out = tmp_path / "tb_run"
    assert main(["train", *fast_flags(shapes, out, "--tensorboard", epochs=2)]) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "test/acc1"} <= set(tags)
    assert [e.step for e in acc.Scalars("test/acc1")] == [0, 1]
    logged = [json.loads(line)["test_acc1"] for line in (out / "log.txt").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("test/acc1")] == pytest.approx(logged)


def test_fast_data_pipeline_trains_from_jpeg_files(tmp_path, capsys):
    """--data-pipeline fast: the same recipe from JPEG files (RandAugment, erasing on the device) learns."""
    from spach.cli import main
    data = make_shapes_folder(tmp_path / "jpeg_shapes", n_train=32, n_val=12, size=64, ext=".jpg")
    out = tmp_path / "fast_run"
    # 5 epochs: with RandAugment on 32 images, 3-epoch runs land anywhere between 33% and 86% (either pipeline)
    flags = fast_flags(data, out, epochs=5, lr=2e-3)
    flags[flags.index("--input-size") + 1] = "64"
    flags[flags.index("--aa") + 1] = "rand-m9-mstd0.5-inc1"
    flags[flags.index("--reprob") + 1] = "0.25"
    assert main(["train", *flags, "--data-pipeline", "fast", "--color-jitter", "0"]) == 0
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 5 and all(math.isfinite(e["train_loss"]) for e in log)
    assert max(e["test_acc1"] for e in log) > 100 / 3 + 15  # well above chance (3 classes)
    # unsupported combinations are refused with the fix, not crashed
    flags[flags.index("--input-size") + 1] = "32"
    rc = main(["train", *flags, "--data-pipeline", "fast", "--output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "use --data-pipeline timm" in err[0]


def test_grad_checkpointing_flag_gives_the_same_run(shapes, tmp_path):
    """--grad-checkpointing recomputes activations in backward: same weights after a seeded run."""
    from spach.cli import main
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert main(["train", *fast_flags(shapes, plain, "--amp", "off", epochs=1)]) == 0
    assert main(["train", *fast_flags(shapes, ckpt, "--amp", "off", "--grad-checkpointing", epochs=1)]) == 0
    a = _load(plain / "checkpoint.pth")["model"]
    b = _load(ckpt / "checkpoint.pth")["model"]
    assert _load(ckpt / "checkpoint.pth")["args"]["grad_checkpointing"] is True
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_original_command_lines_are_accepted(shapes, tmp_path):
    """Flags of the original main.py parse; --stem-type conv4 builds the 4-conv stem (Hybrid-MS-S+ recipe)."""
    from spach.cli import main
    out = tmp_path / "orig_flags"
    flags = fast_flags(shapes, out, epochs=1)
    flags[flags.index("--input-size") + 1] = "64"
    extra = ["--stem-type", "conv4", "--data-set", "IMNET", "--pin-mem", "--dist_url", "env://", "--decay-epochs",
             "30", "--patience-epochs", "10", "--dr", "0.1", "--lr-noise-pct", "0.67", "--resplit", "--opt-eps", "1e-8",
             "--model-ema-decay", "0.99996", "--train-interpolation", "bicubic", "--mixup-switch-prob", "0.5"]
    assert main(["train", *flags, *extra]) == 0
    sd = _load(out / "checkpoint.pth")["model"]
    assert sd["stem.proj.0.weight"].shape[-1] == 7  # conv4 stem
    assert main(["train", *fast_flags(shapes, tmp_path / "x", "--lr-noise", "0.4", epochs=1)]) == 2


def test_cpu_training_keeps_freed_buffers_and_says_so(shapes, tmp_path):
    """On a CPU, `spach train` sets glibc to serve every block from its heap (no mmap: big activations are reused
    instead of page-faulted in each step) and logs it; SPACH_CPU_TUNING=0 leaves the allocator alone."""
    from train_helpers import run_spach
    for env, allocator in (({}, "glibc-tuned"), ({"SPACH_CPU_TUNING": "0"}, "default")):
        r = run_spach("train", *fast_flags(shapes, tmp_path / allocator, epochs=1), env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"allocator {allocator}" in r.stdout + r.stderr


_MMAP_PROBE = """
import ctypes, sys
from spach.runtime.cpu_tuning import apply_cpu_tuning
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tuned":
    apply_cpu_tuning(threads=1)
before = libc.mallinfo2().hblks
block = libc.malloc(96 << 20)  # above glibc's 32 MiB cap on the mmap threshold
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_cpu_tuning_serves_big_blocks_from_the_heap():
    """With the tuning, a 96 MiB block comes from the heap (reused next step) rather than a fresh mmap."""
    import subprocess
    import ctypes
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc older than 2.33 (no mallinfo2)")
    out = {}
    for mode in ("tuned", "default"):
        r = subprocess.run([sys.executable, "-c", _MMAP_PROBE, mode], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, SPACH_CPU_TUNING="1"))
        assert r.returncode == 0, r.stderr
        out[mode] = int(r.stdout.strip())
    assert out == {"tuned": 0, "default": 1}
