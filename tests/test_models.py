"""SPACH models: original checkpoint layout, original math, timm conventions, clear errors."""
import json
import os
import pickle

import pytest
import timm
import torch
from torch import nn

import spach
from spach.errors import CheckpointError
from spach.models import MODEL_CONFIGS, count_flops, count_params, load_pretrained
from spach.models.layers import DownsampleConv, SpatialAttention
from spach.models.spach import MixingBlock

ALL = [n for n in MODEL_CONFIGS if n.startswith("spach_")]  # the SPACH family (others: test_smlp.py)
XXS = [n for n in ALL if "_xxs_" in n]
MS = [n for n in ALL if n.startswith("spach_ms_")]


@pytest.fixture(scope="module")
def manifest(data_dir):
    return json.loads((data_dir / "state_dict_manifest.json").read_text())


@pytest.fixture(scope="module")
def reference(data_dir):
    return json.loads((data_dir / "reference_logits.json").read_text())["models"]


def seeded_state_dict(model, seed):
    """The weight recipe of the reference-logit files in tests/data (sorted keys, seeded randn * 0.05, BatchNorm
    running_var abs() + 0.5, integer buffers zero as at construction; works for models built on "meta")."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sorted(model.state_dict().items()):
        if not v.is_floating_point():
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
            continue
        t = torch.randn(v.shape, generator=g) * 0.05
        out[k] = t.abs() + 0.5 if k.endswith("running_var") else t
    return out


def check_grad_checkpointing(model, x):
    """Gradients with ``set_grad_checkpointing(True)`` equal those without (no random masks in ``model``)."""
    model(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)


def check_bf16_autocast(model, x):
    """``model`` under CPU bf16 autocast (`spach train`'s default where bf16 is native): bf16 logits close to the
    fp32 ones in eval mode, and a finite gradient for every parameter in train mode."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max() + 0.05
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- registry and checkpoint layout ----------------------------------------------------------------------
def test_registry_has_the_original_twenty_plus_s_plus():
    assert len(ALL) == 21
    assert "spach_ms_s_patch4_224_hybrid_plus" in ALL
    for name in ALL:
        assert name in timm.list_models("spach_*"), name
    assert [n for n in spach.list_models() if n.startswith("spach_")] == ALL


@pytest.mark.parametrize("name", [n for n in ALL if not n.endswith("_plus")])
def test_state_dict_matches_original_manifest(name, manifest):
    with torch.device("meta"):
        model = spach.create_model(name)
    ref = manifest[name]
    sd = model.state_dict()
    assert set(sd) == set(ref["state_dict"])
    for k, shape in ref["state_dict"].items():
        assert list(sd[k].shape) == shape, k
    assert count_params(model) == ref["params"]


def test_s_plus_differs_from_hybrid_s_only_in_its_stem(manifest):
    with torch.device("meta"):
        plus = spach.create_model("spach_ms_s_patch4_224_hybrid_plus")
    ref = manifest["spach_ms_s_patch4_224_hybrid"]["state_dict"]
    sd = plus.state_dict()
    assert {k for k in sd if not k.startswith("stem.")} == {k for k in ref if not k.startswith("stem.")}
    assert {k.split(".")[1] for k in sd if k.startswith("stem.")} == {"proj"}
    assert sd["stem.proj.0.weight"].shape == (64, 3, 7, 7)
    assert sd["stem.proj.9.weight"].shape == (128, 64, 2, 2)
    assert isinstance(plus.stem.proj[1], nn.BatchNorm2d)


# --- same logits as the original code -----------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_logits_equal_original_implementation(name, reference):
    ref = reference[name]
    model = spach.create_model(name).eval()
    model.load_state_dict(seeded_state_dict(model, ref["weight_seed"]))
    x = torch.randn((2, 3, 224, 224), generator=torch.Generator().manual_seed(ref["input_seed"]))
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y[:, :16], torch.tensor(ref["logits_first16"]), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(y.sum(1), torch.tensor(ref["logits_sum"]), atol=2e-3, rtol=1e-4)
    assert y.argmax(1).tolist() == ref["argmax"]


def test_architecture_details_of_the_original():
    model = spach.create_model("spach_ms_s_patch4_224_hybrid", drop_path_rate=0.1)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    downs = [m for m in model.modules() if isinstance(m, DownsampleConv)]
    assert len(downs) == 3
    for d in downs:
        conv, gn = d.net[1]
        assert conv.kernel_size == (2, 2) and conv.stride == (2, 2) and conv.bias is None
        assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 1
    blocks = [m for m in model.modules() if isinstance(m, MixingBlock)]
    # layer-scale only on the spatial branch: conv ("pass") blocks have none
    assert all((b.gamma_1 is None) == (b.spatial_func is None) for b in blocks)
    # linear stochastic-depth decay from 0 to drop_path_rate over all blocks
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in blocks]
    expected = [0.1 * i / (len(blocks) - 1) for i in range(len(blocks))]
    assert rates == pytest.approx(expected)
    single = spach.create_model("spach_xxs_patch16_224_attn", drop_path_rate=0.1)
    assert {b.drop_path.drop_prob for b in single.blocks} == {0.1}


def test_cpe_runs_in_parallel_on_the_block_input():
    torch.manual_seed(0)
    block = MixingBlock(16, spatial_func=SpatialAttention, num_heads=2, qkv_bias=True).eval()
    nn.init.normal_(block.gamma_1, std=0.5)
    x = torch.randn(2, 4, 4, 16)
    with torch.no_grad():
        y = x + block.gamma_1 * block.spatial_func(block.norm1(x)) + block.cpe_net(x)
        y = y + block.channel_func(block.norm2(y))
        torch.testing.assert_close(block(x), y)


# --- forward / backward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", XXS)
def test_xxs_forward_backward_at_224(name):
    model = spach.create_model(name, num_classes=42, drop_path_rate=0.1)
    model.train()
    x = torch.randn(2, 3, 224, 224)
    y = model(x)
    assert y.shape == (2, 42)
    y.logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", [n for n in ALL if n not in XXS])
def test_every_model_forward_backward_small_batch(name):
    model = spach.create_model(name, num_classes=42)
    x = torch.randn(1, 3, 224, 224)
    y = model(x)
    assert y.shape == (1, 42) and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_zero_initialised_head_like_the_original():
    model = spach.create_model("spach_ms_xxs_patch4_224_conv")
    assert torch.count_nonzero(model.head.weight) == 0
    with torch.no_grad():
        assert torch.all(model(torch.randn(1, 3, 224, 224)) == 0)


# --- checkpoints ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_xxs():
    torch.manual_seed(1)
    model = spach.create_model("spach_ms_xxs_patch4_224_attn").eval()
    model.load_state_dict(seeded_state_dict(model, 5))
    return model


@pytest.mark.parametrize("layout", ["model", "model_ema", "bare", "ddp", "safetensors"])
def test_checkpoint_round_trip(tmp_path, trained_xxs, layout):
    sd = trained_xxs.state_dict()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = trained_xxs(x)
    if layout == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        payload = {"model": sd, "model_ema": sd, "bare": sd,
                   "ddp": {"model": {"module." + k: v for k, v in sd.items()}}}[layout]
        torch.save({"model_ema": sd} if layout == "model_ema" else
                   payload if layout in ("bare", "ddp") else {"model": sd, "epoch": 3}, path)
    model = spach.create_model("spach_ms_xxs_patch4_224_attn", checkpoint_path=str(path),
                               use_ema=layout == "model_ema").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    timm_model = timm.create_model("spach_ms_xxs_patch4_224_attn").eval()
    load_pretrained(timm_model, str(path), use_ema=layout == "model_ema")
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), expected, atol=0, rtol=0)


def test_checkpoint_of_another_model_is_refused_with_the_keys(tmp_path):
    path = tmp_path / "conv.pth"
    torch.save({"model": spach.create_model("spach_ms_xxs_patch4_224_conv").state_dict()}, path)
    with pytest.raises(CheckpointError) as e:
        spach.create_model("spach_ms_xxs_patch4_224_attn", checkpoint_path=str(path))
    msg = str(e.value)
    assert "missing" in msg and "layer2.1.spatial_func.qkv.weight" in msg
    assert "mis-shaped" in msg and "head.weight (1000, 512) vs model (1000, 256)" in msg
    assert "\n" not in msg
    path2 = tmp_path / "head.pth"
    torch.save({"model": spach.create_model("spach_ms_xxs_patch4_224_conv", num_classes=10).state_dict()}, path2)
    assert spach.create_model("spach_ms_xxs_patch4_224_conv", checkpoint_path=str(path2)).num_classes == 10
    with pytest.raises(CheckpointError, match=r"head.weight \(10, 512\) vs model \(1000, 512\)"):
        spach.create_model("spach_ms_xxs_patch4_224_conv", checkpoint_path=str(path2), num_classes=1000)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["SPACH_EXPLOIT_MARKER"],))


def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SPACH_EXPLOIT_MARKER", str(marker))
    saved = tmp_path / "evil.pth"  # a torch.save checkpoint whose pickle calls os.system
    torch.save({"model": _Exploit()}, saved)
    with pytest.raises(CheckpointError, match="refusing to load .*unsupported GLOBAL posix.system"):
        spach.create_model("spach_ms_xxs_patch4_224_conv", checkpoint_path=str(saved))
    raw = tmp_path / "evil_raw.pth"  # a plain pickle file with the same payload
    with open(raw, "wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="not a weights-only PyTorch checkpoint"):
        spach.create_model("spach_ms_xxs_patch4_224_conv", checkpoint_path=str(raw))
    assert not marker.exists()


def _mapped_file(address: int):
    """The file mapped at ``address`` in this process (Linux), else None."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_checkpoints_are_memory_mapped_and_the_old_format_still_loads(tmp_path):
    from spach.weights import read_checkpoint_file
    model = spach.create_model("spach_ms_xxs_patch4_224_conv", num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    # a training checkpoint: its optimizer state is only mapped, never read, when the weights are what is wanted
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "optimizer": {"state": {0: {"exp_avg": torch.zeros(1000, 1000)}}}}, path)
    ckpt = read_checkpoint_file(path)
    assert _mapped_file(ckpt["optimizer"]["state"][0]["exp_avg"].data_ptr()) == os.path.realpath(path)
    whole = read_checkpoint_file(path, mapped=False)  # what resuming reads: the optimizer keeps these tensors
    assert _mapped_file(whole["optimizer"]["state"][0]["exp_avg"].data_ptr()) != os.path.realpath(path)
    del ckpt, whole
    old = tmp_path / "old_format.pth"  # torch < 1.6's format cannot be mapped: read whole
    torch.save({"model": model.state_dict()}, old, _use_new_zipfile_serialization=False)
    for file in (path, old):
        with torch.no_grad():
            assert torch.equal(spach.create_model("spach_ms_xxs_patch4_224_conv", checkpoint_path=str(file)).eval()(x),
                               expected)


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10, None])
def test_truncated_or_random_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content is None:  # truncated real checkpoint
        torch.save({"model": spach.create_model("spach_ms_xxs_patch4_224_conv").state_dict()}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*bad.pth"):
        spach.create_model("spach_ms_xxs_patch4_224_conv", checkpoint_path=str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        spach.create_model("spach_ms_xxs_patch4_224_conv", checkpoint_path=str(tmp_path / "nope.pth"))


def test_pretrained_without_network_names_the_url_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # a closed local port stands in for a machine without network access
    overlay = dict(url="http://127.0.0.1:9/spach_ms_conv_xxs.pth")
    with pytest.raises(CheckpointError) as e:
        spach.create_model("spach_ms_xxs_patch4_224_conv", pretrained=True, pretrained_cfg_overlay=overlay)
    msg = str(e.value)
    assert "http://127.0.0.1:9/spach_ms_conv_xxs.pth" in msg and "checkpoint_path=" in msg
    cfg = spach.create_model("spach_ms_xxs_patch4_224_conv").pretrained_cfg
    assert cfg["url"] == "https://github.com/microsoft/SPACH/releases/download/v1.0/spach_ms_conv_xxs.pth"


def test_pretrained_downloads_into_a_fresh_hub_cache(tmp_path, trained_xxs, monkeypatch):
    """pretrained=True on a machine whose torch hub cache folder does not exist yet: created, downloaded, loaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "fresh_home"))
    release = tmp_path / "spach_ms_trans_xxs.pth"
    torch.save({"model": trained_xxs.state_dict()}, release)
    model = timm.create_model("spach_ms_xxs_patch4_224_attn", pretrained=True,
                              pretrained_cfg_overlay=dict(url=release.as_uri()))
    assert (tmp_path / "fresh_home" / "hub" / "checkpoints" / "spach_ms_trans_xxs.pth").is_file()
    for (k, a), b in zip(model.state_dict().items(), trained_xxs.state_dict().values()):
        assert torch.equal(a, b), k


def test_pretrained_from_a_local_file(tmp_path, trained_xxs):
    path = tmp_path / "spach_ms_trans_xxs.pth"
    torch.save({"model": trained_xxs.state_dict()}, path)
    model = timm.create_model("spach_ms_xxs_patch4_224_attn", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    for (k, a), b in zip(model.state_dict().items(), trained_xxs.state_dict().values()):
        assert torch.equal(a, b), k


def test_pretrained_cfg_follows_timm_conventions():
    for name in ALL:
        cfg = timm.create_model(name, pretrained=False).pretrained_cfg if name in XXS else \
            timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["input_size"] == (3, 224, 224) and cfg["classifier"] == "head"
        assert cfg["first_conv"] in ("stem.proj", "stem.proj.0")
        assert cfg["fixed_input_size"] == name.endswith("_mlp")
        if MODEL_CONFIGS[name].get("weights"):
            assert cfg["url"].endswith(MODEL_CONFIGS[name]["weights"])


# --- timm model API -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", XXS + ["spach_xxs_patch16_224_attn"])
def test_timm_api(name):
    model = timm.create_model(name, num_classes=42).eval()
    x = torch.randn(2, 3, 224, 224)
    feats = model.forward_features(x)
    assert model.output_fmt == "NHWC" and feats.shape[-1] == model.num_features
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.forward_head(feats).shape == (2, 42)
    assert model.get_classifier().out_features == 42
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    assert isinstance(model.no_weight_decay(), set)
    assert model.group_matcher()["stem"]


@pytest.mark.parametrize("name", ["spach_ms_xxs_patch4_224_attn", "spach_ms_xxs_patch4_224_mlp",
                                  "spach_xxs_patch16_224_conv"])
def test_grad_checkpointing_same_output_and_gradients(name):
    torch.manual_seed(0)
    model = spach.create_model(name, num_classes=5)
    model.load_state_dict(seeded_state_dict(model, 3))
    check_grad_checkpointing(model, torch.randn(2, 3, 224, 224))


@pytest.mark.parametrize("name", MS)
def test_features_only_gives_four_nchw_stages(name):
    size = 224 if name.endswith("_mlp") else 256
    model = timm.create_model(name, features_only=True).eval()
    feats = model(torch.randn(1, 3, size, size))
    chans = model.feature_info.channels()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert [f.shape for f in feats] == [(1, c, size // r, size // r) for c, r in zip(chans, [4, 8, 16, 32])]
    assert chans[1] == 2 * chans[0] and chans[3] == 8 * chans[0]


def test_features_only_out_indices_and_checkpoint(tmp_path, trained_xxs):
    path = tmp_path / "w.pth"
    torch.save({"model": trained_xxs.state_dict()}, path)
    model = spach.create_model("spach_ms_xxs_patch4_224_attn", features_only=True, out_indices=(2, 3),
                               checkpoint_path=str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    feats = model(x)
    assert [f.shape[1] for f in feats] == [128, 256]
    with torch.no_grad():
        ref = trained_xxs.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
    torch.testing.assert_close(feats[1], ref)


@pytest.mark.parametrize("name", ["spach_ms_xxs_patch4_224_conv", "spach_ms_xxs_patch4_224_mlp",
                                  "spach_xxs_patch16_224_attn", "spach_ms_s_patch4_224_hybrid_plus"])
def test_torchscript_matches_eager(name):
    model = spach.create_model(name).eval()
    model.load_state_dict(seeded_state_dict(model, 11))
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_sdpa_equals_explicit_softmax_attention():
    fused = spach.create_model("spach_ms_xxs_patch4_224_attn", num_classes=10)
    fused.load_state_dict(seeded_state_dict(fused, 2))
    plain = spach.create_model("spach_ms_xxs_patch4_224_attn", num_classes=10, fused_attn=False)
    plain.load_state_dict(fused.state_dict())
    assert all(m.fused_attn for m in fused.modules() if isinstance(m, SpatialAttention))
    x = torch.randn(1, 3, 160, 160)
    for mode in (False, True):  # eval and train (dropout 0)
        fused.train(mode), plain.train(mode)
        torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-4)


def test_cpu_bf16_training_attention_takes_explicit_path(monkeypatch):
    """A bf16 CPU training step uses the explicit softmax (faster there), up to the token bound; inference and
    fp32 keep SDPA. Both paths give the same values and gradients within bf16 rounding."""
    import torch.nn.functional as F
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    attn = SpatialAttention(32, num_heads=2).train()
    x = torch.randn(2, 8, 8, 32)

    def run(grad=True, max_tokens=1024):
        attn.cpu_bf16_explicit_max_tokens = max_tokens
        calls.clear()
        xi = x.clone().requires_grad_(grad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(xi)
        if grad:
            out.float().square().sum().backward()
        return out.float(), (xi.grad if grad else None), len(calls)

    out_e, grad_e, n_e = run()
    assert n_e == 0                                        # 64 tokens <= 1024: explicit
    out_s, grad_s, n_s = run(max_tokens=16)
    assert n_s == 1                                        # above the bound: SDPA
    torch.testing.assert_close(out_e, out_s, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad_e, grad_s, atol=5e-2, rtol=5e-2)
    with torch.no_grad():
        assert run(grad=False)[2] == 1                     # inference: SDPA
    calls.clear()
    attn(x.requires_grad_())                               # fp32 training: SDPA
    assert len(calls) == 1


# --- input sizes and names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", [("spach_ms_xxs_patch4_224_conv", (256, 256)),
                                       ("spach_ms_xxs_patch4_224_attn", (160, 160)),
                                       ("spach_ms_xxs_patch4_224_attn", (192, 256)),
                                       ("spach_xxs_patch16_224_attn", (160, 240)),
                                       ("spach_xxs_patch16_224_conv", (256, 256))])
def test_conv_and_attention_models_take_other_input_sizes(name, size):
    model = spach.create_model(name, num_classes=3).eval()
    assert model(torch.randn(1, 3, *size)).shape == (1, 3)


def test_spatial_mlp_models_say_they_are_tied_to_their_size():
    model = spach.create_model("spach_ms_xxs_patch4_224_mlp").eval()
    with pytest.raises(ValueError, match=r"only takes 224x224 inputs \(got 256x256\).*img_size=256"):
        model(torch.randn(1, 3, 256, 256))
    other = spach.create_model("spach_ms_xxs_patch4_224_mlp", img_size=256, num_classes=3).eval()
    assert other(torch.randn(1, 3, 256, 256)).shape == (1, 3)


def test_bad_input_sizes_and_names_are_clear():
    model = spach.create_model("spach_ms_xxs_patch4_224_conv").eval()
    with pytest.raises(ValueError, match="not a multiple of this model's total stride 32"):
        model(torch.randn(1, 3, 200, 224))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(spach.SpachError, match="did you mean spach_ms_xxs_patch4_224_conv"):
        spach.create_model("spach_ms_xxs_patch4_224_cnv")
    with pytest.raises(spach.SpachError, match="spach models"):
        spach.create_model("resnet50")


def test_shared_spatial_func_shares_one_module():
    model = spach.create_model("spach_ms_xxs_patch4_224_attn", shared_spatial_func=True)
    mixers = {id(b.spatial_func) for b in model.layer3 if isinstance(b, MixingBlock)}
    assert len(mixers) == 1
    # the original layout stores the shared mixer under every block's name
    assert "layer3.6.spatial_func.qkv.weight" in model.state_dict()
    assert count_params(model) < count_params(spach.create_model("spach_ms_xxs_patch4_224_attn"))
    with pytest.raises(ValueError, match="shared_spatial_func"):
        spach.create_model("spach_ms_s_patch4_224_hybrid", shared_spatial_func=True)


def test_stem_type_option():
    model = spach.create_model("spach_ms_xxs_patch4_224_conv", stem_type="conv4").eval()
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    with pytest.raises(ValueError, match="stem_type"):
        spach.create_model("spach_ms_xxs_patch4_224_conv", stem_type="conv3")


# --- FLOPs ------------------------------------------------------------------------------------------------------
def test_flops_match_the_published_table(data_dir):
    published = json.loads((data_dir / "published.json").read_text())["models"]
    published["spach_ms_s_patch4_224_hybrid_plus"] = published.pop("spach_ms_s_patch4_224_hybrid (stem conv4)")
    for name, ref in published.items():
        with torch.device("meta"):
            model = spach.create_model(name)
        gflops = count_flops(model) / 1e9
        # Conv/Trans-MS-S and the XXS models round to the table. MLP-MS-S, Hybrid-MS-S and -S+ are
        # 0.10-0.15 G below the published figure: the same totals come out of fvcore and of the original
        # flops() formulas on these modules, so the table's figures for those three were not produced by
        # counting this architecture; we keep the honest count (see README).
        tol = 0.05 if ref["GFLOPs"] < 1 else 0.16
        assert abs(gflops - ref["GFLOPs"]) <= tol, (name, gflops, ref["GFLOPs"])
        assert round(count_params(model) / 1e6) == pytest.approx(ref["params_M"], abs=1)


@pytest.mark.parametrize("name", ["spach_ms_xxs_patch4_224_conv", "spach_ms_xxs_patch4_224_attn",
                                  "spach_ms_xxs_patch4_224_mlp", "spach_xxs_patch16_224_attn",
                                  "spach_ms_s_patch4_224_hybrid_plus"])
def test_analytic_flops_agree_with_torch_flop_counter(name):
    """Matmuls and convolutions measured by torch's FlopCounterMode (2 FLOPs per MAC) must account for
    the analytic count up to the small elementwise terms (biases, norms, residual adds)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = spach.create_model(name, fused_attn=False).eval()  # explicit matmuls are what the counter sees
    for size in ((224, 224),) if name.endswith("_mlp") else ((224, 224), (160, 192)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.randn(1, 3, *size))
        measured = counter.get_total_flops() / 2
        analytic = count_flops(model, img_size=size)
        assert analytic >= measured
        assert analytic == pytest.approx(measured, rel=0.02)


def test_models_cli_lists_every_model(capsys):
    from spach.cli import main
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ALL:
        assert name in out
    assert "83.9" in out and "12.21" in out and "43.58" in out


def test_safetensors_metadata_rebuilds_the_model(tmp_path):
    import json as _json
    from safetensors.torch import save_file
    model = spach.create_model("spach_ms_xxs_patch4_224_mlp", num_classes=7, img_size=64).eval()
    model.load_state_dict(seeded_state_dict(model, 9))
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path), metadata={"num_classes": "7", "img_size": _json.dumps([64, 64])})
    again = spach.create_model("spach_ms_xxs_patch4_224_mlp", checkpoint_path=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
