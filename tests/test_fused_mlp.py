"""The channel MLPs' oneDNN inference path (spach.models.fused): the same outputs as the plain layers in every
family, taken exactly where it may be (fp32 CPU inference) and nowhere else (training, autograd, autocast, graph
capture, switched off)."""
from functools import partial

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import spach
from spach.models import fused
from spach.models.layers import ChannelMLP

pytestmark = pytest.mark.skipif(not fused._onednn_linear_available(), reason="this torch has no oneDNN linear")

FUSED_OP = "mkldnn::_linear_pointwise"
# one model of each family at a 64x64 input (sMLPNet and the SPACH MLP models are built for it)
MODELS = [("shiftvit_light_tiny", {}), ("shiftvit_r2_tiny", dict(norm_layer="BN", act_layer="RELU")),
          ("smlpnet_tiny", dict(img_size=64)), ("spach_ms_xxs_patch4_224_mlp", dict(img_size=64)),
          ("spach_xxs_patch16_224_conv", {})]
SIZE = 64


def ops_run(fn):
    """(result of ``fn()``, the names of the operators it ran)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


def build(name, **kwargs):
    torch.manual_seed(0)
    model = spach.create_model(name, **kwargs).eval()
    for m in model.modules():  # non-trivial norms and biases, so that a misplaced bias would show
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.normal_(m.bias, std=0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(std=0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name,kwargs", MODELS, ids=[n for n, _ in MODELS])
def test_inference_takes_the_fused_path_with_the_plain_outputs(name, kwargs):
    model = build(name, **kwargs)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        fast, ran = ops_run(lambda: model(x))
        with fused.plain_path():
            plain, ran_plain = ops_run(lambda: model(x))
    assert FUSED_OP in ran and FUSED_OP not in ran_plain
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), plain, rtol=1e-5, atol=1e-5)


def test_the_path_is_not_taken_where_it_may_not_be():
    model = build("shiftvit_light_tiny")
    x = torch.randn(2, 3, SIZE, SIZE)
    _, ran = ops_run(lambda: model(x))  # autograd on
    assert FUSED_OP not in ran
    model.train()
    with torch.no_grad():
        _, ran = ops_run(lambda: model(x))  # training mode: dropout and drop-path are live
    assert FUSED_OP not in ran
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, ran = ops_run(lambda: model(x))  # bf16 autocast keeps its own kernels
    assert FUSED_OP not in ran
    with torch.no_grad():
        traced = torch.jit.trace(model, x)  # a captured graph holds the plain layers
    assert "_linear_pointwise" not in str(traced.inlined_graph)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", [partial(nn.GELU, approximate="tanh"), nn.ReLU, nn.SiLU], ids=["gelu-tanh", "relu",
                                                                                              "silu"])
def test_each_activation_in_its_epilogue_or_the_plain_path(act):
    mlp = ChannelMLP(24, 96, act_layer=act).eval()
    x = torch.randn(2, 5, 7, 24)
    with torch.no_grad():
        fast, ran = ops_run(lambda: mlp(x))
        with fused.plain_path():
            plain = mlp(x)
    assert (FUSED_OP in ran) == (act is not nn.SiLU)  # oneDNN has no SiLU epilogue here: the plain layers run
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_set_enabled_returns_the_previous_setting():
    assert fused.enabled()
    assert fused.set_enabled(False) is True
    try:
        assert not fused.enabled()
    finally:
        fused.set_enabled(True)
