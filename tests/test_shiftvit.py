"""ShiftViT: the original checkpoint layout and logits, both normalizations, the registry's arguments honoured,
the timm model API, FLOPs against the published table, and the whole system (train / eval / predict / export /
benchmark / launcher) on it."""
import json
import os
import re

import pytest
import timm
import torch
from torch import nn

import spach
from spach.errors import CheckpointError
from spach.models import count_flops, count_params, load_pretrained, model_config
from spach.models.shiftvit import SHIFTVIT_CONFIGS, ShiftViT, _shift_inplace, shift_channels
from test_models import check_bf16_autocast, check_grad_checkpointing, seeded_state_dict
from test_timm_compat import fx_model

NAMES = list(SHIFTVIT_CONFIGS)
TINY = "shiftvit_light_tiny"
RELEASED = {"shiftvit_light_tiny": "shiftvit_tiny_light.pth", "shiftvit_r2_tiny": "shiftvit_tiny_r2.pth",
            "shiftvit_light_small": "shiftvit_small_light.pth", "shiftvit_r2_small": "shiftvit_small_r2.pth"}


@pytest.fixture(scope="module")
def manifest(data_dir):
    return json.loads((data_dir / "state_dict_manifest_smlp_shiftvit.json").read_text())


def seeded_model(name, seed, **kwargs):
    """``name`` with seeded weights, built on the meta device (no initialisation cost) and then filled."""
    with torch.device("meta"):
        model = spach.create_model(name, **kwargs)
    model.load_state_dict(seeded_state_dict(model, seed), assign=True)
    return model.eval()


# --- registry and checkpoint layout ----------------------------------------------------------------------
def test_the_nine_registry_names_everywhere():
    assert NAMES == [f"shiftvit_{kind}_{size}" for size in ("tiny", "small", "base") for kind in ("light", "r4", "r2")]
    assert set(timm.list_models("shiftvit_*")) == set(NAMES)
    assert set(NAMES) <= set(spach.list_models())
    assert isinstance(timm.create_model("shiftvit_r4_tiny", num_classes=3), ShiftViT)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_original_manifest(name, manifest):
    with torch.device("meta"):
        model = spach.create_model(name)
    ref = manifest[name]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict"]
    assert count_params(model) == ref["params"]


# --- same logits as the original code -----------------------------------------------------------------
def _cases(data_dir):
    return json.loads((data_dir / "reference_logits_shiftvit.json").read_text())["cases"]


@pytest.mark.parametrize("case", _cases(__import__("pathlib").Path(__file__).parent / "data"),
                         ids=lambda c: f"{c['model']}-{c['norm_layer']}-{c['act_layer']}-{c['img_size']}")
def test_logits_equal_original_implementation(case):
    model = seeded_model(case["model"], case["weight_seed"], norm_layer=case["norm_layer"],
                         act_layer=case["act_layer"])
    size = case["img_size"]
    x = torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(case["input_seed"]))
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y[:, :16], torch.tensor(case["logits_first16"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.sum(1), torch.tensor(case["logits_sum"]), atol=2e-3, rtol=1e-4)
    assert y.argmax(1).tolist() == case["argmax"]


def test_shift_is_the_original_zero_filled_one_pixel_shift_with_its_gradient():
    x = torch.randn(2, 26, 5, 7, requires_grad=True)
    g = 26 // 12
    expected = torch.zeros_like(x)
    expected[:, :g, :, :-1] = x[:, :g, :, 1:]               # left
    expected[:, g:2 * g, :, 1:] = x[:, g:2 * g, :, :-1]     # right
    expected[:, 2 * g:3 * g, :-1] = x[:, 2 * g:3 * g, 1:]   # up
    expected[:, 3 * g:4 * g, 1:] = x[:, 3 * g:4 * g, :-1]   # down
    expected[:, 4 * g:] = x[:, 4 * g:]
    out = shift_channels(x, 12)
    assert torch.equal(out, expected)
    w = torch.randn_like(out)
    got, = torch.autograd.grad((out * w).sum(), x)
    want, = torch.autograd.grad((expected * w).sum(), x)
    assert torch.equal(got, want)
    cl = x.detach().contiguous(memory_format=torch.channels_last)
    assert torch.equal(shift_channels(cl, 12), expected.detach())
    for fresh in (x.detach().clone(), cl.clone()):  # inference's in-place shift of a new residual sum
        assert torch.equal(_shift_inplace(fresh, g), expected.detach())


# --- the original's options and its defects fixed ------------------------------------------------------------
def test_norm_and_activation_options():
    bn = spach.create_model(TINY, norm_layer="BN", act_layer="RELU")
    assert isinstance(bn.patch_embed.norm, nn.BatchNorm2d) and isinstance(bn.layers[0].blocks[0].norm2, nn.BatchNorm2d)
    assert isinstance(bn.layers[0].blocks[0].mlp.act, nn.ReLU)
    gn = spach.create_model(TINY)
    assert isinstance(gn.norm, nn.GroupNorm) and gn.norm.num_groups == 1
    assert isinstance(gn.layers[3].blocks[1].mlp.act, nn.GELU)
    with pytest.raises(ValueError, match="norm_layer='LN' is not one of"):
        spach.create_model(TINY, norm_layer="LN")


def test_registry_arguments_are_honoured_and_its_drop_path_rate_is_the_default():
    model = spach.create_model("shiftvit_r2_base", num_classes=10, drop_path_rate=0.1, img_size=256)
    assert model.head.out_features == 10 and model.img_size == (256, 256)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.layers for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    # the registry rate, which trained the published models, is the default
    for name, rate in (("shiftvit_r2_base", 0.6), ("shiftvit_light_small", 0.4), ("shiftvit_r2_tiny", 0.2)):
        assert model_config(name)["drop_path_rate"] == rate
        with torch.device("meta"):
            m = spach.create_model(name)
        assert m.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(rate)
    assert count_flops(model) == count_flops(model, (256, 256)) > count_flops(model, (224, 224))


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (256, 256)])
def test_any_multiple_of_32_is_an_input_size(size):
    model = seeded_model(TINY, 3, num_classes=4)
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 4)


def test_bad_input_sizes_are_one_clear_line():
    model = seeded_model(TINY, 3, num_classes=4)
    with pytest.raises(ValueError, match="input 200x224 is not a multiple of this model's total stride 32"):
        model(torch.randn(1, 3, 200, 224))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))


# --- checkpoints and the two normalizations ------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """GroupNorm and BatchNorm release-layout files ({'model': state_dict}) of shiftvit_light_tiny."""
    root = tmp_path_factory.mktemp("shiftvit_ckpt")
    out = {}
    for i, norm in enumerate(("GN1", "BN")):
        model = seeded_model(TINY, 40 + i, norm_layer=norm)
        out[norm] = (model, root / f"light_tiny_{norm}.pth")
        torch.save({"model": model.state_dict()}, out[norm][1])
    return out


@pytest.mark.parametrize("norm", ["GN1", "BN"])
def test_checkpoint_path_builds_the_files_normalization(files, norm):
    ref, path = files[norm]
    model = spach.create_model(TINY, checkpoint_path=str(path)).eval()
    assert type(model.norm) is type(ref.norm)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)
    timm_model = timm.create_model(TINY, norm_layer=norm).eval()
    load_pretrained(timm_model, str(path))
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), ref(x), atol=0, rtol=0)


@pytest.mark.parametrize("norm,other", [("GN1", "BN"), ("BN", "GN1")])
def test_wrong_normalization_stops_in_one_line_and_loads_nothing(files, norm, other):
    _, path = files[norm]
    with pytest.raises(CheckpointError) as e:
        spach.create_model(TINY, checkpoint_path=str(path), norm_layer=other)
    msg = str(e.value)
    assert f"norm_layer={norm!r}" in msg and "\n" not in msg
    target = spach.create_model(TINY, norm_layer=other)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_pretrained(target, str(path))
    msg = str(e.value)
    assert f"norm_layer={norm!r}" in msg and "\n" not in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # never half loaded


def test_eval_predict_and_export_build_the_files_normalization(files):
    from spach.inference import build_model
    ref, path = files["BN"]
    model, info = build_model(TINY, str(path))  # what spach eval / predict / export call
    assert isinstance(model.norm, nn.BatchNorm2d) and not model.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)


def test_a_checkpoint_is_read_from_disk_once_per_model_built(files, monkeypatch, tmp_path):
    # ShiftViT's file is asked for its recorded options, for the normalization its weights fix and for the
    # weights: one torch.load, and nothing of the file is held once the model is built
    import spach.weights
    from spach.inference import build_model
    ref, path = files["BN"]
    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    model = spach.create_model(TINY, checkpoint_path=str(path)).eval()
    assert loads == [str(path)]
    build_model(TINY, str(path))  # spach eval / predict / export
    assert len(loads) == 2
    copy = tmp_path / "copy.pth"
    torch.save({"model": ref.state_dict(), "epoch": 1}, copy)
    weights = spach.weights.open_weights(copy)  # asked for its facts, its variant and its weights: one read
    assert weights.facts["epoch"] == 1 and weights.state_dict() is weights.state_dict() and len(loads) == 3
    rebuilt = spach.create_model(TINY, checkpoint_path=weights)
    assert len(loads) == 3 and isinstance(rebuilt, type(model))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)


def test_checkpoint_of_another_model_is_refused_with_the_keys(files, tmp_path):
    _, path = files["GN1"]
    with pytest.raises(CheckpointError) as e:
        spach.create_model("shiftvit_r4_tiny", checkpoint_path=str(path))
    msg = str(e.value)
    assert "missing 42 keys: layers.2.blocks.10.mlp.fc1.bias" in msg and "\n" not in msg
    other = tmp_path / "spach.pth"
    torch.save({"model": spach.create_model("spach_ms_xxs_patch4_224_conv").state_dict()}, other)
    with pytest.raises(CheckpointError, match="unexpected .*layer1.0.channel_func"):
        spach.create_model(TINY, checkpoint_path=str(other))
    with pytest.raises(CheckpointError, match="missing .*layer1.0.channel_func"):
        spach.create_model("spach_ms_xxs_patch4_224_conv", checkpoint_path=str(path))


def test_pretrained_cfg_release_urls_and_timm_conventions():
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["input_size"] == (3, 224, 224) and not cfg["fixed_input_size"]
        assert cfg["first_conv"] == "patch_embed.proj" and cfg["classifier"] == "head"
        if name in RELEASED:
            assert cfg["url"] == "https://github.com/microsoft/SPACH/releases/download/v1.0/" + RELEASED[name]
        else:
            assert cfg["url"] == "" and "no released weights" in cfg["description"]
    with pytest.raises(CheckpointError, match="no official weights were released for shiftvit_r4_tiny"):
        spach.create_model("shiftvit_r4_tiny", pretrained=True)


def test_pretrained_from_a_local_release_file(files):
    ref, path = files["GN1"]
    model = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# --- timm model API -----------------------------------------------------------------------------------------
def test_timm_api():
    model = seeded_model(TINY, 5, num_classes=42)
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert model.output_fmt == "NCHW" and feats.shape == (2, 768, 2, 2) and model.num_features == 768
    assert model.forward_head(feats, pre_logits=True).shape == (2, 768)
    assert model.forward_head(feats).shape == (2, 42) and model.get_classifier().out_features == 42
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, 768)
    assert isinstance(model.no_weight_decay(), set) and model.group_matcher()["stem"] == r"^patch_embed"
    assert model.default_cfg["architecture"] == TINY


def test_features_only_gives_four_nchw_maps_at_strides_4_to_32(files):
    _, path = files["GN1"]
    model = spach.create_model(TINY, features_only=True, checkpoint_path=str(path)).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [96, 192, 384, 768]
    feats = model(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(1, 96, 24, 32), (1, 192, 12, 16), (1, 384, 6, 8), (1, 768, 3, 4)]
    two = timm.create_model(TINY, features_only=True, out_indices=(1, 3)).eval()
    assert two.feature_info.channels() == [192, 768]


def test_grad_checkpointing_same_output_and_gradients():
    model = spach.create_model(TINY, num_classes=5, drop_path_rate=0.0)  # no random masks between the runs
    model.load_state_dict(seeded_state_dict(model, 3))
    check_grad_checkpointing(model, torch.randn(2, 3, 64, 64))


def test_fx_trace_and_torchscript_match_eager():
    from spach.models.base import check_image_batch
    model = seeded_model(TINY, 8, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    graph = fx_model(model)
    assert any(n.target is check_image_batch for n in graph.graph.nodes)  # the input check runs with the graph
    with torch.no_grad():
        expected = model(x)  # the same operators in eager inference and in both graphs: the same bits
        assert torch.equal(graph(x)["head"], expected)
        assert torch.equal(torch.jit.script(model)(x), expected)
        with pytest.raises(ValueError, match="not a multiple of this model's total stride 32"):
            graph(torch.randn(1, 3, 72, 64))


# --- FLOPs ------------------------------------------------------------------------------------------------------
def test_flops_and_params_match_the_published_table(data_dir):
    published = json.loads((data_dir / "published.json").read_text())["more_models"]
    for name in NAMES:
        ref = published[name]
        if "GFLOPs" not in ref:
            continue
        with torch.device("meta"):
            model = spach.create_model(name)
        gflops = count_flops(model) / 1e9
        # every published ShiftViT figure within 2.4% (Shift-T: 4.61 counted, 4.5 published)
        assert gflops == pytest.approx(ref["GFLOPs"], rel=0.05), (name, gflops)
        assert round(count_params(model) / 1e6) == pytest.approx(ref["params_M"], abs=1)


def test_analytic_flops_agree_with_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    model = seeded_model(TINY, 1)
    for size in ((224, 224), (160, 96)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.randn(1, 3, *size))
        measured = counter.get_total_flops() / 2
        analytic = count_flops(model, img_size=size)
        assert analytic >= measured and analytic == pytest.approx(measured, rel=0.02)


def test_models_cli_lists_shiftvit_with_paper_names(capsys):
    from spach.cli import main
    assert main(["models", "--filter", "shiftvit"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("shiftvit")}
    assert set(rows) == set(NAMES)
    assert re.search(r"\b28\.\d\d\s+4\.61\s+81\.7\s+Shift-T$", rows["shiftvit_r2_tiny"])
    assert rows["shiftvit_r2_small"].rstrip().endswith("82.8  Shift-S")
    assert re.search(r"\s-\s*$", rows["shiftvit_r4_base"])


# --- the whole system on ShiftViT -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from train_helpers import make_shapes_folder
    return make_shapes_folder(tmp_path_factory.mktemp("shapes"), n_train=32, n_val=12)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """`spach train --model shiftvit_light_tiny`, 3 epochs of 32x32 shapes, one thread."""
    import contextlib
    import io
    from spach.cli import main
    from train_helpers import TINY_MODEL, fast_flags
    out = tmp_path_factory.mktemp("run")
    # lr 5e-4: at the SPACH tests' 2e-3 (no warm-up) ShiftViT's loss jumps to ~10 in the first steps
    flags = [TINY if f == TINY_MODEL else f for f in fast_flags(shapes, out, epochs=3, lr=5e-4)]
    buf = io.StringIO()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(["train", *flags])
    finally:
        torch.set_num_threads(n)
    return rc, out, buf.getvalue()


def test_short_training_run_learns(trained):
    rc, out, _ = trained
    assert rc == 0
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    assert max(line["test_acc1"] for line in lines) >= 45.0  # chance is 33% (18 steps; 50% measured)
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    saved = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert saved["args"]["model"] == TINY and "layers.3.blocks.1.norm2.weight" in saved["model"]


def test_eval_predict_export_and_benchmark_take_the_trained_checkpoint(trained, shapes, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="spach[export] extra (onnxruntime) not installed")
    pytest.importorskip("onnxscript", reason="spach[export] extra (onnxscript) not installed")
    from spach.cli import main
    _, out, _ = trained
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    ckpt = str(out / "best.pth")
    assert main(["eval", "--checkpoint", ckpt, "--data-path", shapes, "--device", "cpu", "--num_workers", "0"]) == 0
    assert f"* Acc@1 {best['max_accuracy']:.3f}" in capsys.readouterr().out
    image = sorted((__import__("pathlib").Path(shapes) / "val" / "circle").glob("*.png"))[0]
    assert main(["predict", "--checkpoint", ckpt, str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == TINY
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt"), ("safetensors", "m.safetensors")):
        assert main(["export", "--checkpoint", ckpt, "--format", fmt, "--output", str(tmp_path / name)]) == 0, fmt
        printed = capsys.readouterr().out
        if fmt == "onnx":
            assert float(re.search(r"max abs diff vs PyTorch ([0-9.e+-]+)", printed).group(1)) < 1e-4
    again = spach.create_model(TINY, checkpoint_path=str(tmp_path / "m.safetensors")).eval()
    ref = spach.create_model(TINY, checkpoint_path=ckpt, num_classes=3, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref(x), atol=0, rtol=0)
    report = tmp_path / "bench.json"
    assert main(["benchmark", "--model", TINY, "--device", "cpu", "--img-size", "64", "--batch-size", "2",
                 "--steps", "1", "--warmup", "1", "--repeats", "1", "--amp", "off", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["results"][0]["img_per_s"] > 0


def test_modelzoo_launcher_with_shiftvit(shapes, tmp_path):
    import subprocess
    import sys
    from train_helpers import REPO
    out_id = f"pytest-{os.getpid()}-shiftvit"
    env = dict(os.environ, PYTHON=sys.executable, ASCEND_DEVICE_ID=out_id, OMP_NUM_THREADS="1")
    args = [f"--data_path={shapes}", "--model=shiftvit_r2_tiny", "--batch_size=16", "--input_size=32",
            "--device=cpu", "--num_workers=0", "--aa=none", "--reprob=0", "--mixup=0", "--cutmix=0",
            "--no-model-ema", "--no-repeated-aug", "--warmup-epochs=0", "--cooldown-epochs=0"]
    try:
        r = subprocess.run(["bash", "test/train_performance_1p.sh", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert float(re.search(r"^Final Performance images/sec : ([0-9.]+)$", r.stdout, re.M).group(1)) > 0
        log = open(os.path.join(REPO, "test", "output", out_id, f"train_{out_id}.log")).read()
        assert "shiftvit_r2_tiny" in log and "Epoch: [0]" in log
    finally:
        import shutil
        shutil.rmtree(os.path.join(REPO, "test", "output", out_id), ignore_errors=True)


def test_inference_autograd_and_captured_paths_give_the_same_values():
    """Without autograd the residual add is fused with the next shift; with it the shift has its own backward;
    graph capture uses pure functions. All three compute the same map (the first and the last bit for bit)."""
    model = seeded_model(TINY, 12, num_classes=10)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        inference = model(x)
        captured = fx_model(model)(x)["head"]
    for p in model.parameters():
        p.requires_grad_(True)
    with_grad = model(x)  # on the fp32 CPU: the MLPs' fused training function (oneDNN's products)
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), inference, atol=1e-6, rtol=0)
    assert torch.equal(captured, inference)  # the same operators: the same bits


def test_stochastic_depth_without_autograd_is_the_blocks_own():
    """Train mode under no_grad (live DropPath) takes the stage's own path: the same draws as running the blocks."""
    model = seeded_model(TINY, 12, num_classes=10)
    model.train()
    stage = model.layers[2]
    assert all(blk.drop_path.drop_prob > 0 for blk in stage.blocks)
    x = torch.randn(2, stage.blocks[0].dim, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.manual_seed(3)
        fused = stage.forward_blocks(x)
        torch.manual_seed(3)
        plain = stage.blocks(x)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)


# --- --norm-layer / --act-layer in spach train ----------------------------------------------------------------
def _train(argv):
    import contextlib
    import io
    from spach.cli import main
    buf = io.StringIO()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = main(["train", *argv])
    finally:
        torch.set_num_threads(n)
    return rc, buf.getvalue()


def _one_epoch(shapes, out, *extra):
    from train_helpers import TINY_MODEL, fast_flags
    return [TINY if f == TINY_MODEL else f for f in fast_flags(shapes, out, *extra, epochs=1, lr=5e-4)]


def test_finetune_takes_the_files_normalization_and_the_flags_choose_one(files, shapes, tmp_path):
    _, bn_file = files["BN"]
    # --finetune from a BatchNorm file, no --norm-layer: the file fixes it (it used to stop on missing keys)
    rc, log = _train(_one_epoch(shapes, tmp_path / "ft", "--finetune", str(bn_file)))
    assert rc == 0, log[-2000:]
    saved = torch.load(tmp_path / "ft" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert saved["args"]["norm_layer"] == "BN" and saved["args"]["act_layer"] == "GELU"
    assert "layers.0.blocks.0.norm2.running_mean" in saved["model"]
    # a flag that contradicts the file: one line naming the flag to use; nothing is created
    rc, log = _train(_one_epoch(shapes, tmp_path / "bad", "--finetune", str(bn_file), "--norm-layer", "GN1"))
    assert rc != 0 and "use --norm-layer BN (or leave --norm-layer out)" in log
    assert not (tmp_path / "bad").exists()
    # from scratch with both flags; the run's choice is part of its identity when resuming
    rc, log = _train(_one_epoch(shapes, tmp_path / "relu", "--norm-layer", "BN", "--act-layer", "RELU"))
    assert rc == 0, log[-2000:]
    # the activation leaves no trace in the weights: the checkpoint's recorded choice rebuilds it
    from spach.inference import build_model
    ckpt = str(tmp_path / "relu" / "checkpoint.pth")
    model = spach.create_model(TINY, checkpoint_path=ckpt, num_classes=3)
    evaluated, info = build_model(None, ckpt)  # spach eval / predict / export
    for m in (model, evaluated):
        assert isinstance(m.norm, nn.BatchNorm2d) and isinstance(m.layers[0].blocks[0].mlp.act, nn.ReLU)
    assert info.metadata()["act_layer"] == "RELU"  # and so an export records it
    with pytest.raises(CheckpointError, match=r"act_layer='RELU'"):
        spach.create_model(TINY, checkpoint_path=ckpt, num_classes=3, act_layer="GELU")
    rc, log = _train(_one_epoch(shapes, tmp_path / "relu", "--epochs", "2", "--act-layer", "RELU"))
    assert rc != 0 and "--norm-layer BN in the checkpoint, GN1 now" in log


def test_variant_flags_are_refused_for_other_families(shapes, tmp_path):
    from train_helpers import fast_flags
    rc, log = _train(fast_flags(shapes, tmp_path / "o", "--norm-layer", "BN", epochs=1))
    assert rc != 0 and "--norm-layer chooses a ShiftViT variant" in log and "leave --norm-layer out" in log
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("norm", ["GN1", "BN"])
def test_bf16_autocast_matches_fp32_and_trains(norm):
    """CPU bf16 autocast (`spach train`'s default where bf16 is native): the MLP's linear layers run in bf16,
    the logits stay close to fp32, and every parameter gets a finite gradient."""
    check_bf16_autocast(seeded_model(TINY, 5, num_classes=10, norm_layer=norm), torch.randn(2, 3, 64, 64))
