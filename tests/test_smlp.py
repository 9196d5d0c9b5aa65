"""sMLPNet: the original checkpoint layout and logits, its defects fixed, the timm model API, FLOPs."""
import json

import pytest
import timm
import torch
from torch import nn

import spach
from spach.errors import CheckpointError
from spach.models import count_flops, count_params, default_drop_path_rate, load_pretrained
from spach.models.smlp import SMLPNet
from test_models import check_bf16_autocast, check_grad_checkpointing, seeded_state_dict

NAMES = ["smlpnet_tiny", "smlpnet_small", "smlpnet_base"]
SMALL = dict(img_size=64)  # a 2x2 grid in the last stage: fast, and every code path of 224 runs


@pytest.fixture(scope="module")
def manifest(data_dir):
    return json.loads((data_dir / "state_dict_manifest_smlp_shiftvit.json").read_text())


@pytest.fixture(scope="module")
def published(data_dir):
    return json.loads((data_dir / "published.json").read_text())["more_models"]


@pytest.fixture(scope="module")
def tiny64():
    model = spach.create_model("smlpnet_tiny", num_classes=5, **SMALL).eval()
    model.load_state_dict(seeded_state_dict(model, 4))
    return model


# --- registry, layout, original logits ---------------------------------------------------------------------
def test_the_three_registry_names_in_spach_and_timm():
    assert timm.list_models("smlpnet_*") == sorted(NAMES)
    assert [n for n in spach.list_models() if n.startswith("smlpnet")] == NAMES
    assert isinstance(timm.create_model("smlpnet_tiny", **SMALL), SMLPNet)
    with pytest.raises(spach.SpachError, match="did you mean smlpnet_tiny"):
        spach.create_model("smlpnet_tiyn")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_the_original_key_for_key(name, manifest):
    with torch.device("meta"):
        model = spach.create_model(name)
    ref = manifest[name]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict"]
    assert count_params(model) == ref["params"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_original_implementation(name, data_dir):
    ref = json.loads((data_dir / "reference_logits_smlpnet.json").read_text())["models"][name]
    model = spach.create_model(name).eval()
    model.load_state_dict(seeded_state_dict(model, ref["weight_seed"]))
    x = torch.randn((2, 3, 224, 224), generator=torch.Generator().manual_seed(ref["input_seed"]))
    with torch.no_grad():
        y = model(x)
    assert (y - torch.tensor(ref["logits"])).abs().max().item() <= 1e-4
    assert y.argmax(1).tolist() == ref["argmax"]


def test_block_math_is_the_original_token_and_channel_mixing():
    """One block written out as the original code computes it (NCHW, permutes, concatenation)."""
    torch.manual_seed(0)
    model = spach.create_model("smlpnet_tiny", num_classes=3, **SMALL).eval()
    model.load_state_dict(seeded_state_dict(model, 8))
    dw, smlp = model.token_mix[0]
    norm, ff = model.channel_mix[0][1], model.channel_mix[0][2]
    x = torch.randn(2, 80, 16, 16)
    with torch.no_grad():
        t = dw.conv_merge.Conv(nn.functional.gelu(dw.conv_merge.BN(x)))
        t = nn.functional.gelu(smlp.BN(t))
        t_h = smlp.proj_h(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        t_w = smlp.proh_w(t.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        y = x + smlp.fuse(torch.cat([t, t_h, t_w], dim=1))
        y = y + ff(norm(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        ours = model._block(x.permute(0, 2, 3, 1), model.token_mix[0], model.channel_mix[0], model.drop_path[0])
    torch.testing.assert_close(ours.permute(0, 3, 1, 2), y, atol=1e-5, rtol=1e-5)


# --- the original's defects, fixed ----------------------------------------------------------------------------
def _rates(model):
    return [m.drop_prob if hasattr(m, "drop_prob") else 0.0 for m in model.drop_path]


@pytest.mark.parametrize("name,rate", [("smlpnet_tiny", 0.0), ("smlpnet_small", 0.2), ("smlpnet_base", 0.3)])
def test_drop_path_default_is_the_registry_rate_and_an_explicit_one_wins(name, rate):
    assert default_drop_path_rate(name) == rate
    with torch.device("meta"):
        default = spach.create_model(name)
        explicit = spach.create_model(name, drop_path_rate=0.1)
    n = len(default.drop_path)
    assert _rates(default) == pytest.approx([rate * i / (n - 1) for i in range(n)])
    assert _rates(explicit) == pytest.approx([0.1 * i / (n - 1) for i in range(n)])
    with pytest.raises(TypeError, match="drop_path_rate="):
        spach.create_model(name, dp_rate=0.1)


def test_spach_models_keep_the_recipe_drop_path_default():
    assert default_drop_path_rate("spach_ms_s_patch4_224_conv") is None


def test_input_size_is_fixed_by_the_grid_and_img_size_builds_another():
    model = spach.create_model("smlpnet_tiny", num_classes=3).eval()
    with pytest.raises(ValueError, match=r"only takes 224x224 inputs \(got 256x256\).*img_size=256"):
        model(torch.randn(1, 3, 256, 256))
    other = spach.create_model("smlpnet_tiny", num_classes=3, img_size=96).eval()
    assert other.token_mix[0][1].proj_h.weight.shape == (24, 24, 1, 1)
    assert other(torch.randn(2, 3, 96, 96)).shape == (2, 3)
    wide = spach.create_model("smlpnet_tiny", num_classes=3, img_size=(64, 96)).eval()
    assert wide(torch.randn(1, 3, 64, 96)).shape == (1, 3)
    with pytest.raises(ValueError, match="img_size=200 .* multiple of 32"):
        spach.create_model("smlpnet_tiny", img_size=200)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        other(torch.randn(1, 1, 96, 96))


# --- checkpoints -----------------------------------------------------------------------------------------------
def test_release_layout_checkpoint_loads_and_gives_the_same_logits(tmp_path, tiny64):
    path = tmp_path / "smlp_t.pth"
    torch.save({"model": tiny64.state_dict(), "epoch": 299}, path)
    x = torch.randn(2, 3, 64, 64)
    model = spach.create_model("smlpnet_tiny", num_classes=5, checkpoint_path=str(path), **SMALL).eval()
    again = timm.create_model("smlpnet_tiny", num_classes=5, **SMALL).eval()
    load_pretrained(again, str(path))
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny64(x), atol=0, rtol=0)
        torch.testing.assert_close(again(x), tiny64(x), atol=0, rtol=0)


def test_checkpoint_of_another_model_is_refused_with_the_keys(tmp_path, tiny64):
    path = tmp_path / "t.pth"
    torch.save({"model": tiny64.state_dict()}, path)
    with pytest.raises(CheckpointError) as e:
        spach.create_model("smlpnet_small", num_classes=5, checkpoint_path=str(path), **SMALL)
    msg = str(e.value)
    assert "missing 264 keys: channel_mix.26.1.bias" in msg and "batch_norm.bias (640,) vs model (768,)" in msg
    assert "\n" not in msg
    spach_file = tmp_path / "spach.pth"
    torch.save({"model": spach.create_model("spach_ms_xxs_patch4_224_conv").state_dict()}, spach_file)
    with pytest.raises(CheckpointError, match="unexpected .* keys: .*layer1"):
        spach.create_model("smlpnet_tiny", checkpoint_path=str(spach_file))


def test_pretrained_cfg_names_the_release_files():
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["input_size"] == (3, 224, 224) and cfg["pool_size"] == (7, 7) and cfg["fixed_input_size"]
        assert cfg["classifier"] == "mlp_head.0" and cfg["first_conv"] == "to_patch_embedding.0.0"
    prefix = "https://github.com/microsoft/SPACH/releases/download/v1.0/"
    assert timm.models.get_pretrained_cfg("smlpnet_small").url == prefix + "smlp_s.pth"
    assert timm.models.get_pretrained_cfg("smlpnet_base").url == prefix + "smlp_b.pth"
    tiny = timm.models.get_pretrained_cfg("smlpnet_tiny")
    assert not tiny.url and "no release file" in tiny.notes[0]
    with pytest.raises(CheckpointError, match="no official weights were released for smlpnet_tiny"):
        spach.create_model("smlpnet_tiny", pretrained=True)


# --- timm model API ----------------------------------------------------------------------------------------
def test_timm_api(tiny64):
    model = timm.create_model("smlpnet_tiny", num_classes=42, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 2, 640) and model.num_features == 640
    assert model.forward_head(feats, pre_logits=True).shape == (2, 640)
    assert model.forward_head(feats).shape == (2, 42) and model.get_classifier().out_features == 42
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, 640)
    assert model.group_matcher()["stem"] and isinstance(model.no_weight_decay(), set)


def test_features_only_gives_four_nchw_stages(tmp_path, tiny64):
    path = tmp_path / "w.pth"
    torch.save({"model": tiny64.state_dict()}, path)
    model = spach.create_model("smlpnet_tiny", features_only=True, checkpoint_path=str(path), **SMALL).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [80, 160, 320, 640]
    x = torch.randn(1, 3, 64, 64)
    feats = model(x)
    assert [f.shape for f in feats] == [(1, 80, 16, 16), (1, 160, 8, 8), (1, 320, 4, 4), (1, 640, 2, 2)]
    with torch.no_grad():
        ref = tiny64.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
    torch.testing.assert_close(feats[3], ref)


def test_grad_checkpointing_same_output_and_gradients():
    model = spach.create_model("smlpnet_tiny", num_classes=5, depths=(1, 1, 2, 1), **SMALL)
    model.load_state_dict(seeded_state_dict(model, 3))
    check_grad_checkpointing(model, torch.randn(2, 3, 64, 64))


def test_torchscript_and_fx_match_eager(tiny64):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tiny64(x)  # the same operators in eager inference and in both graphs: the same bits
        assert torch.equal(torch.jit.script(tiny64)(x), expected)
        from timm.models import create_feature_extractor
        fx = create_feature_extractor(tiny64, return_nodes=["mlp_head"])  # torch.fx graph of the forward
        assert torch.equal(fx(x)["mlp_head"], expected)


# --- FLOPs and the model list -----------------------------------------------------------------------------
def test_flops_within_5_percent_of_the_published_table(published):
    for name in NAMES:
        with torch.device("meta"):
            model = spach.create_model(name)
        ref = published[name]
        assert count_flops(model) / 1e9 == pytest.approx(ref["GFLOPs"], rel=0.05), name
        assert count_params(model) / 1e6 == pytest.approx(ref["params_M"], abs=0.6), name


def test_analytic_flops_agree_with_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    model = spach.create_model("smlpnet_tiny", **SMALL).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    measured = counter.get_total_flops() / 2
    analytic = count_flops(model)
    # the analytic count also has the norms, biases and residual adds, which the counter skips
    assert measured <= analytic <= measured * 1.03


def test_models_cli_lists_smlpnet_with_published_figures(capsys):
    from spach.cli import main
    assert main(["models", "--filter", "smlpnet"]) == 0
    out = capsys.readouterr().out
    assert "sMLPNet-S" in out and "83.1" in out and "48.56" in out and "10.36" in out
    assert "sMLPNet-T" in out and "81.9" in out


def test_bf16_autocast_matches_fp32_and_trains():
    """`spach train` runs CPU bf16 autocast where the CPU has native bf16: the fused products take the dtype
    autocast gives them, the logits stay close to fp32, and every parameter gets a finite gradient."""
    torch.manual_seed(0)
    check_bf16_autocast(spach.create_model("smlpnet_tiny", num_classes=10, **SMALL), torch.randn(2, 3, 64, 64))
