"""What timm's own model test-suite expects of a registered model, checked on small variants of each family: fx
tracing (the traced graph computes eager inference's logits bit for bit), pool_size in the pretrained cfg, the
features_only wrapper's cfg, and at least three default feature levels."""
from collections import Counter

import pytest
import timm
import torch
from torch.profiler import ProfilerActivity, profile
from timm.models import get_notrace_functions, get_notrace_modules, get_pretrained_cfg
from torchvision.models.feature_extraction import create_feature_extractor

import spach
from spach.models import MODEL_CONFIGS
from spach.models.base import check_image_batch

TRACER_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def fx_model(model):
    """The model as a torch.fx graph whose output ``"head"`` is the logits: torchvision's extractor with timm's leaf
    modules / functions, as timm's tests build it (they name the graph's last node, here the classifier)."""
    head = next(name for name, m in model.named_modules() if m is model.get_classifier())
    return create_feature_extractor(model, return_nodes={head: "head"}, tracer_kwargs=TRACER_KWARGS)


# one model of each family (three SPACH kinds), small inputs; as timm's test_model_forward_fx, under inference_mode
FX_MODELS = [("spach_ms_xxs_patch4_224_attn", 64), ("spach_ms_xxs_patch4_224_mlp", 64),
             ("spach_xxs_patch16_224_conv", 64), ("smlpnet_tiny", 64), ("shiftvit_light_tiny", 64)]
# the operators that compute (not views, copies or allocations): where eager and a graph could round differently
ARITHMETIC = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::gelu", "aten::relu",
              "aten::convolution", "aten::native_layer_norm", "aten::native_group_norm", "aten::native_batch_norm",
              "aten::add", "aten::add_", "aten::mul", "aten::mean", "aten::sum",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::softmax")


def seeded(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size, num_classes=7).eval()
    for p in model.get_classifier().parameters():  # SPACH starts from a zero head: equal logits would prove nothing
        torch.nn.init.normal_(p)
    return model


def arithmetic_run(fn):
    """(result of ``fn()``, how many times it ran each computing operator, and every oneDNN linear it ran)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    names = Counter(e.name for e in prof.events())
    return out, {k: n for k, n in names.items() if k in ARITHMETIC or k.startswith("mkldnn::")}


@pytest.mark.parametrize("name,size", FX_MODELS)
def test_fx_traced_graph_equals_eager_and_keeps_the_input_check(name, size):
    model = seeded(name, size)
    graph = fx_model(model)
    assert any(n.target is check_image_batch for n in graph.graph.nodes)  # a leaf call, run with the graph
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        eager = model(x)
        assert torch.equal(graph(x)["head"], eager)  # bit for bit, as timm asserts: the same operators run
        with pytest.raises(ValueError, match=f"not a multiple of this model's total stride {model.total_stride}"):
            graph(torch.randn(1, 3, size + 8, size))


@pytest.mark.parametrize("name,size", FX_MODELS[2:])
def test_eager_inference_runs_the_operators_of_its_fx_graph(name, size):
    """Eager inference and the traced graph run the same computing operators, the same number of times, and no
    oneDNN linear: so they give the same bits whatever the CPU, which no comparison of outputs on one CPU shows.
    (Inside ``packed_weights`` eager inference takes the fused MLPs: ``tests/test_fused_mlp.py``.)"""
    model = seeded(name, size)
    graph = fx_model(model)
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        eager, eager_ops = arithmetic_run(lambda: model(x))
        traced, graph_ops = arithmetic_run(lambda: graph(x)["head"])
    assert eager_ops == graph_ops and "aten::addmm" in eager_ops
    assert not any(k.startswith("mkldnn::") for k in eager_ops)
    assert torch.equal(traced, eager)


def test_fx_graph_trains_attention_and_scripts():
    torch.manual_seed(0)
    model = timm.create_model("spach_ms_xxs_patch4_224_attn", img_size=64, num_classes=5).train()
    graph = create_feature_extractor(model, train_return_nodes=["head"], eval_return_nodes=["head"],
                                     tracer_kwargs=TRACER_KWARGS)
    graph(torch.randn(2, 3, 64, 64))["head"].square().sum().backward()
    assert all(p.grad is not None for p in graph.parameters())
    scripted = torch.jit.script(graph.eval())
    with torch.no_grad():
        assert scripted(torch.randn(1, 3, 64, 64))["head"].shape == (1, 5)


def test_eager_input_errors_stay_clear():
    model = spach.create_model("spach_xxs_patch16_224_attn", img_size=64).eval()
    with pytest.raises(ValueError, match="not a multiple of this model's total stride 16"):
        model(torch.randn(1, 3, 72, 60))
    with pytest.raises(ValueError, match=r"expected an image batch of shape \(B, 3, H, W\), got \(1, 4, 64, 64\)"):
        model(torch.randn(1, 4, 64, 64))


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_every_name_keeps_the_default_cfg_contract_of_timms_test(name):
    """timm's test_model_default_cfgs on every registered name, shapes only (meta tensors: no arithmetic): pool_size
    is the unpooled feature size at the default input; pre-logits, a removed classifier and a removed pool give the
    sizes the model reports; the cfg's classifier and first conv name real weights."""
    cfg = get_pretrained_cfg(name).to_dict()
    x = torch.empty(1, *cfg["input_size"], device="meta")
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        feats = model.forward_features(x)
        pre_logits = model.forward_head(feats, pre_logits=True)
        state = model.state_dict()
        model.reset_classifier(0)
        pooled = model(x)
        model.reset_classifier(0, "")
        unpooled = model(x)
        built_bare = timm.create_model(name, num_classes=0, global_pool="").eval()(x)
    nhwc = model.output_fmt == "NHWC"
    assert model.output_fmt == ("NCHW" if name.startswith("shiftvit_") else "NHWC")
    spatial = (lambda t: tuple(t.shape[1:3])) if nhwc else (lambda t: tuple(t.shape[2:4]))
    assert spatial(feats) == cfg["pool_size"] == ((14, 14) if "_patch16_" in name else (7, 7))
    assert feats.shape[3 if nhwc else 1] == model.num_features
    assert pre_logits.shape == pooled.shape == (1, model.head_hidden_size) and model.num_classes == 0
    assert unpooled.ndim == built_bare.ndim == 4 and spatial(unpooled) == spatial(built_bare) == cfg["pool_size"]
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state


@pytest.mark.parametrize("name", ["spach_ms_xxs_patch4_224_conv", "spach_xxs_patch16_224_mlp"])
def test_features_only_wrapper_carries_the_pretrained_cfg(name):
    features = timm.create_model(name, features_only=True)
    full = timm.create_model(name).pretrained_cfg
    assert features.default_cfg is features.pretrained_cfg
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "fixed_input_size", "pool_size", "url"):
        assert features.pretrained_cfg[key] == full[key], key
    assert timm.data.resolve_data_config({}, model=features)["input_size"] == (3, 224, 224)


def test_single_stage_features_are_the_last_three_blocks_by_default():
    model = timm.create_model("spach_xxs_patch16_224_conv", img_size=64).eval()
    features = timm.create_model("spach_xxs_patch16_224_conv", img_size=64, features_only=True).eval()
    features.model.load_state_dict(model.state_dict(), strict=False)  # pruned: its head and final norm are gone
    assert features.feature_info.channels() == [384] * 3
    assert features.feature_info.reduction() == [16] * 3
    assert [i["module"] for i in features.feature_info.get_dicts()] == ["blocks.9", "blocks.10", "blocks.11"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = features(x)
        want = model.forward_intermediates(x, indices=3, intermediates_only=True)
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].shape == (1, 384, 4, 4)
    chosen = timm.create_model("spach_xxs_patch16_224_conv", img_size=64, features_only=True, out_indices=(0, 5))
    assert [i["module"] for i in chosen.feature_info.get_dicts()] == ["blocks.0", "blocks.5"]
    assert len(chosen.model.blocks) == 6  # the blocks after the last one taken are pruned


def test_forward_intermediates_match_forward_features_with_every_level():
    model = timm.create_model("spach_ms_xxs_patch4_224_attn", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, levels = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), atol=0, rtol=0)
    assert [t.shape[1:] for t in levels] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    with torch.no_grad():
        nhwc = model.forward_intermediates(x, indices=[-1], output_fmt="NHWC", intermediates_only=True)
    torch.testing.assert_close(nhwc[0], levels[-1].permute(0, 2, 3, 1), atol=0, rtol=0)


def test_import_spach_alone_registers_every_family_with_timm():
    """`import spach` then `timm.create_model(name)`: in a fresh interpreter, with nothing else imported first."""
    import subprocess
    import sys
    code = ("import spach, timm\n"
            "names = timm.list_models('spach_*') + timm.list_models('smlpnet_*') + timm.list_models('shiftvit_*')\n"
            "assert len(names) == len(spach.list_models()) == 33, names\n"
            "m = timm.create_model('smlpnet_tiny', num_classes=3)\n"
            "print(type(m).__module__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "spach.models.smlp"
