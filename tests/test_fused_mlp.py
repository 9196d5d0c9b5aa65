"""The fused channel MLPs (spach.models.fused): the same outputs and gradients as the plain layers in every
family, taken where they may be (fp32 on the CPU: inference inside packed_weights in every family, training in
ShiftViT) and nowhere else (inference outside that scope, autocast, active dropout, graph capture, switched off)."""
from functools import partial

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import spach
from spach.models import fused
from spach.models.layers import ChannelMLP
from spach.models.shiftvit import ShiftMlp

pytestmark = pytest.mark.skipif(not fused._onednn_linear_available(), reason="this torch has no oneDNN linear")

FUSED_OP = "mkldnn::_linear_pointwise"
# one model of each family at a 64x64 input (sMLPNet and the SPACH MLP models are built for it)
MODELS = [("shiftvit_light_tiny", {}), ("shiftvit_r2_tiny", dict(norm_layer="BN", act_layer="RELU")),
          ("smlpnet_tiny", dict(img_size=64)), ("spach_ms_xxs_patch4_224_mlp", dict(img_size=64)),
          ("spach_xxs_patch16_224_conv", {})]
IDS = [n + ("-bn-relu" if k.get("norm_layer") else "") for n, k in MODELS]
SIZE = 64


def ops_run(fn):
    """(result of ``fn()``, the names of the operators it ran)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


def build(name, **kwargs):
    torch.manual_seed(0)
    model = spach.create_model(name, drop_path_rate=0.0, **kwargs).eval()
    nn.init.normal_(model.get_classifier().weight, std=0.1)  # some families start from a zero head
    for m in model.modules():  # non-trivial norms and biases, so that a misplaced bias would show
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.normal_(m.bias, std=0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(std=0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name,kwargs", MODELS, ids=IDS)
def test_inference_is_fused_inside_its_scope_only_with_the_plain_outputs(name, kwargs):
    model = build(name, **kwargs)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        outside, ran_outside = ops_run(lambda: model(x))
        with fused.plain_path():
            plain = model(x)
        with fused.packed_weights(model, pack=False):  # fused, the weights reordered on every call
            fast, ran = ops_run(lambda: model(x))
            assert not any(entry[1] for entry in fused._packed.values())  # nothing packed
    # outside the scope: the plain layers, bit for bit (what every captured graph of the model computes)
    assert FUSED_OP in ran and FUSED_OP not in ran_outside
    assert torch.equal(outside, plain)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    with torch.inference_mode(), fused.packed_weights(model):
        torch.testing.assert_close(model(x), plain, rtol=1e-5, atol=1e-5)


def _grads(model, x, target):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    return loss.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("name,kwargs", MODELS, ids=IDS)
def test_training_gradients_equal_the_plain_ones(name, kwargs):
    model = build(name, **kwargs).train()
    # BatchNorm statistics of a 2x2 last stage of a few images would turn rounding into real differences (with
    # ReLU's kinks): a larger input there
    size = 128 if kwargs.get("norm_layer") == "BN" else SIZE
    x, target = torch.randn(4, 3, size, size), torch.tensor([1, 5, 7, 2])
    (loss, gx, grads), ran = ops_run(lambda: _grads(model, x, target))
    with fused.plain_path():
        (loss_p, gx_p, grads_p), ran_plain = ops_run(lambda: _grads(model, x, target))
    # the training function runs where it measured a gain (ShiftViT); sMLPNet and SPACH train on the plain layers
    assert (FUSED_OP in ran) == name.startswith("shiftvit") and FUSED_OP not in ran_plain
    torch.testing.assert_close(loss, loss_p, rtol=1e-5, atol=1e-6)
    # With BatchNorm + ReLU, fp32 rounding alone moves some ReLU inputs across the kink, on either path: measured
    # here, the plain fp32 path's input gradient was 1e-6 or 5e-4 from float64 depending on the input, the fused one
    # 7e-4. So the whole model is held to 1e-2 there (a path computing something else is off by O(1)); the ReLU
    # epilogue and its gradient are held exactly by test_each_activation_in_its_epilogue_or_the_plain_path.
    limit = 1e-2 if kwargs.get("act_layer") == "RELU" else 1e-4
    assert _relative_error(gx, gx_p) < limit
    assert grads.keys() == grads_p.keys() and all(g is not None for g in grads.values())
    # a bias right before a BatchNorm has a zero gradient in exact arithmetic: only rounding is left to compare
    errors = {n: _relative_error(grads[n], grads_p[n]) for n in grads if grads_p[n].norm() > 1e-5}
    assert len(errors) > len(grads) // 2 and max(errors.values()) < limit, max(errors.items(), key=lambda kv: kv[1])


def shift_mlp(act=nn.GELU, drop=0.0):
    """ShiftViT's channel MLP (the one family that trains on the fused path), on channels-last NCHW maps."""
    return ShiftMlp(16, 64, act_layer=act, drop=drop)


def maps():
    return torch.randn(2, 16, 4, 3).contiguous(memory_format=torch.channels_last)


def test_frozen_weights_and_an_input_without_gradient():
    mlp = shift_mlp().train()
    mlp.fc1.weight.requires_grad_(False)
    x = maps()
    (mlp(x) ** 2).sum().backward()
    assert mlp.fc1.weight.grad is None and mlp.fc1.bias.grad is not None and mlp.fc2.weight.grad is not None
    got = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}
    mlp.zero_grad(set_to_none=True)
    with fused.plain_path():
        (mlp(x) ** 2).sum().backward()
    for n, g in got.items():
        torch.testing.assert_close(g, mlp.get_parameter(n).grad, rtol=1e-5, atol=1e-6)


def test_the_path_is_not_taken_where_it_may_not_be():
    model = build("shiftvit_light_tiny")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), fused.packed_weights(model), torch.autocast("cpu", dtype=torch.bfloat16):
        _, ran = ops_run(lambda: model(x))  # bf16 autocast keeps its own kernels
    assert FUSED_OP not in ran
    with torch.no_grad(), fused.packed_weights(model):
        traced = torch.jit.trace(model, x)  # a captured graph holds the plain layers, even traced in the scope
    assert "_linear_pointwise" not in str(traced.inlined_graph)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))  # and so computes what eager inference outside the scope does
    mlp = shift_mlp(drop=0.1)
    y = maps()
    _, ran = ops_run(lambda: mlp.train()(y))  # live dropout between the layers: the plain path
    assert FUSED_OP not in ran
    _, ran = ops_run(lambda: ChannelMLP(16, 64).train()(torch.randn(2, 3, 4, 16)))  # SPACH trains plain
    assert FUSED_OP not in ran
    with torch.no_grad(), fused.packed_weights(mlp):
        _, ran = ops_run(lambda: mlp.eval()(y))  # eval: dropout is the identity
        assert FUSED_OP in ran
        _, ran = ops_run(lambda: mlp.double()(y.double()))
        assert FUSED_OP not in ran


@pytest.mark.parametrize("act", [partial(nn.GELU, approximate="tanh"), nn.ReLU, nn.SiLU], ids=["gelu-tanh", "relu",
                                                                                              "silu"])
def test_each_activation_in_its_epilogue_or_the_plain_path(act):
    mlp = ChannelMLP(24, 96, act_layer=act).eval()
    x = torch.randn(2, 5, 7, 24)
    with torch.no_grad(), fused.packed_weights(mlp):
        fast, ran = ops_run(lambda: mlp(x))
        with fused.plain_path():
            plain = mlp(x)
    assert (FUSED_OP in ran) == (act is not nn.SiLU)  # oneDNN has no SiLU epilogue here: the plain layers run
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    mlp = shift_mlp(act).train()
    x = maps()
    xg = x.clone().requires_grad_()
    _, ran = ops_run(lambda: mlp(xg).square().sum().backward())
    assert (FUSED_OP in ran) == (act is not nn.SiLU)
    got = [xg.grad] + [p.grad for p in mlp.parameters()]
    mlp.zero_grad(set_to_none=True)
    xp = x.clone().requires_grad_()
    with fused.plain_path():
        mlp(xp).square().sum().backward()
    for g, r in zip(got, [xp.grad] + [p.grad for p in mlp.parameters()]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_set_enabled_returns_the_previous_setting():
    assert fused.enabled()
    assert fused.set_enabled(False) is True
    try:
        assert not fused.enabled()
    finally:
        fused.set_enabled(True)


def _mlp_modules(model):
    return [m for m in model.modules() if isinstance(m, (ShiftMlp, ChannelMLP)) or type(m).__name__ == "FeedForward"]


@pytest.mark.parametrize("name,kwargs", MODELS, ids=IDS)
def test_packed_weights_give_the_plain_outputs_and_are_released(name, kwargs):
    model = build(name, **kwargs)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        with fused.plain_path():
            plain = model(x)
        with fused.packed_weights(model):
            packed = model(x)
            again = model(x)
            packs = [p for m in _mlp_modules(model) for _, p, _ in fused._packed[id(m)][1].values()]
    assert packs and all(p.layout == torch._mkldnn for p in packs)  # every MLP ran on its packed weights
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, packed, rtol=0, atol=0)
    assert not fused._packed  # nothing kept once the scope ends


def test_packed_weights_follow_a_weight_changed_in_place_and_stay_with_their_model():
    model, other = build("shiftvit_light_tiny"), build("shiftvit_light_tiny")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), fused.packed_weights(model):
        model(x)
        other(x)  # outside the scope: the plain layers, nothing packed for it
        assert not any(id(m) in fused._packed for m in other.modules())
        for m in _mlp_modules(model):
            m.fc1.weight.mul_(1.5)  # through the parameter: seen, repacked
        changed = model(x)
        with fused.plain_path():
            expected = model(x)
        with fused.packed_weights(model):  # nested: the inner scope's end keeps the outer one's packs
            model(x)
        assert id(_mlp_modules(model)[0]) in fused._packed
        copy = __import__("copy").deepcopy(model)  # nothing unpicklable hangs on the modules
    torch.testing.assert_close(changed, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(copy(x), expected, rtol=1e-5, atol=1e-5)
    assert not fused._packed


def _linear_spy(monkeypatch):
    """The weight layouts of every oneDNN linear the fused path runs from now on."""
    seen = []
    real = fused._linear

    def spy(x, weight, *args):
        seen.append(weight.layout)
        return real(x, weight, *args)
    monkeypatch.setattr(fused, "_linear", spy)
    return seen


def test_evaluate_runs_on_packed_weights_and_releases_them(monkeypatch):
    from spach.train.evaluation import evaluate
    model = build("shiftvit_light_tiny", num_classes=3)
    data = [(torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 0]), torch.zeros(4, dtype=torch.long))]
    seen = _linear_spy(monkeypatch)
    stats = evaluate(data, model, torch.device("cpu"), reduce=False)
    assert stats["n"] == 4 and seen and set(seen) == {torch._mkldnn}
    assert not fused._packed


def test_residual_sum_in_the_epilogue_or_the_plain_sum():
    mlp = build("shiftvit_light_tiny").layers[0].blocks[0].mlp
    x = torch.randn(2, 96, 8, 8).contiguous(memory_format=torch.channels_last)
    residual = torch.randn_like(x)
    with torch.no_grad(), fused.packed_weights(mlp):
        with fused.plain_path():
            expected = residual + mlp(x)
        got, ran = ops_run(lambda: mlp.forward_residual(x, residual))
        with fused.plain_path():
            plain_got, ran_plain = ops_run(lambda: mlp.forward_residual(x, residual))
        nchw = residual.contiguous()  # its channels-last view is not contiguous: the sum is taken outside
        strided, _ = ops_run(lambda: mlp.forward_residual(x, nchw))
    assert FUSED_OP in ran and FUSED_OP not in ran_plain
    for out in (got, plain_got, strided):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert out.data_ptr() not in (x.data_ptr(), residual.data_ptr(), nchw.data_ptr())  # always a new tensor


def test_smlpnet_channel_mixing_residual_in_the_epilogue():
    model = build("smlpnet_tiny", img_size=SIZE)
    ff = model.channel_mix[0][2]
    x = torch.randn(2, 16, 16, ff.net[0].in_features)
    residual = torch.randn_like(x)
    with torch.no_grad(), fused.packed_weights(ff):
        with fused.plain_path():
            expected = residual + ff(x)
            assert torch.equal(ff.forward_residual(x, residual), expected)
        got, ran = ops_run(lambda: ff.forward_residual(x, residual))
    assert FUSED_OP in ran
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # train mode without autograd, stochastic depth live: the same draws as the blocks with autograd
    model.train()
    for drop in model.drop_path:
        if hasattr(drop, "drop_prob"):
            drop.drop_prob = 0.5
    img = torch.randn(2, 3, SIZE, SIZE)
    torch.manual_seed(5)
    with torch.no_grad():
        no_grad = model.forward_features(img)
    torch.manual_seed(5)
    with_grad = model.forward_features(img).detach()
    torch.testing.assert_close(no_grad, with_grad, rtol=1e-5, atol=1e-5)


def test_packed_weights_of_a_model_built_under_inference_mode():
    with torch.inference_mode():
        model = build("shiftvit_light_tiny")  # its parameters are inference tensors: no version counter
        x = torch.randn(2, 3, SIZE, SIZE)
        with fused.plain_path():
            plain = model(x)
        with fused.packed_weights(model):
            packed = model(x)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_benchmark_inference_runs_the_fused_path(monkeypatch, packed):
    """`spach benchmark --mode infer` measures the inference of `spach eval`: the fused MLPs inside their scope,
    on packed weights, or reordered on every call for the 'unpacked' variant."""
    from spach.bench.runner import BenchConfig, Workload
    seen = _linear_spy(monkeypatch)
    wl = Workload(BenchConfig(model="shiftvit_light_tiny", mode="infer", batch_size=2, img_size=SIZE, amp="off",
                              num_classes=10, packed_weights=packed))
    try:
        wl.step()
    finally:
        wl.close()
    assert seen and set(seen) == {torch._mkldnn if packed else torch.strided}
    assert not fused._packed


def test_predict_runs_the_fused_path_on_packed_weights(monkeypatch, tmp_path, capsys):
    from PIL import Image
    from spach.cli import main
    model = build("shiftvit_light_tiny", num_classes=3)
    ckpt = tmp_path / "best.pth"
    torch.save({"model": model.state_dict(), "args": {"model": "shiftvit_light_tiny", "input_size": SIZE,
                                                       "nb_classes": 3}}, ckpt)
    Image.new("RGB", (80, 70), (20, 200, 40)).save(tmp_path / "green.png")
    seen = _linear_spy(monkeypatch)
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "green.png"), "--json"]) == 0
    assert '"predictions"' in capsys.readouterr().out
    assert seen and set(seen) == {torch._mkldnn}
    assert not fused._packed
