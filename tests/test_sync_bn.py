"""--sync-bn: BatchNorm over the global batch under DDP. Two gloo ranks of 8 samples give the running statistics
and gradients of one process of 16; a 2-process ``spach train --sync-bn`` run trains and saves plain BatchNorm
keys; one process, or a model without BatchNorm, is refused in one line."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from spach.errors import SpachError
from spach.models import create_model
from spach.models.smlp import SparseMLP
from spach.runtime.device import DistInfo
from spach.train.model import sync_batchnorm
from spach.train.sync_bn import CpuSyncBatchNorm, convert_sync_batchnorm
from train_helpers import fast_flags, make_shapes_folder, run_spach

WORLD, PER_RANK, STEPS = 2, 8, 2


class _Net(nn.Module):
    """Conv + BatchNorm2d (on a channels-last input), one real sMLPNet sparse-MLP block (BatchNorm on a permuted
    view), and a BatchNorm1d on the pooled features: every kind of BatchNorm input the models give."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.smlp = SparseMLP((4, 4), 6)
        self.bn1d = nn.BatchNorm1d(6, momentum=None)  # the cumulative average
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x.contiguous(memory_format=torch.channels_last))))
        x = self.smlp(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        return self.head(self.bn1d(x.mean((1, 2)) * 3 + 1))  # an offset mean: the variance must not cancel


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(WORLD * PER_RANK, 3, 4, 4, generator=g, dtype=dtype) * 2 + 0.5 for _ in range(STEPS)]
    w = torch.randn(WORLD * PER_RANK, 5, generator=g, dtype=dtype)
    return xs, w


def _train(model, xs, w, lo, hi):
    """STEPS forward+backward passes on samples [lo, hi) (loss: the mean over those samples); returns the last
    step's input gradient (the parameters keep theirs)."""
    for x in xs:
        model.zero_grad()
        xi = x[lo:hi].clone().requires_grad_(True)
        loss = (model(xi) * w[lo:hi]).sum(1).mean()
        loss.backward()
    return xi.grad


DTYPES = (torch.float64, torch.float32)


def _rank(rank, store, out):
    import warnings
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for dtype in DTYPES:
            torch.manual_seed(1 + rank)  # another init per rank: DDP broadcasts rank 0's
            model = convert_sync_batchnorm(_Net().to(dtype), "cpu")
            assert sum(isinstance(m, CpuSyncBatchNorm) for m in model.modules()) == 3
            with warnings.catch_warnings():  # torch 2.14 deprecates the argument the trainer passes
                warnings.simplefilter("ignore", FutureWarning)
                ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
            xs, w = _inputs(dtype)
            grad_x = _train(ddp, xs, w, rank * PER_RANK, (rank + 1) * PER_RANK)
            torch.save({"state": model.state_dict(), "grads": {k: p.grad for k, p in model.named_parameters()},
                        "grad_x": grad_x}, os.path.join(out, f"{dtype}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_of_8_equal_one_process_of_16(tmp_path):
    """Forward + backward (twice) of BatchNorm layers under DDP on 2 gloo ranks x 8 samples against one process
    on the 16: the same running statistics (and counts), parameter gradients and input gradients, to float64
    rounding, and to float32 rounding in float32."""
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    for dtype in DTYPES:
        torch.manual_seed(1)
        ref = _Net().to(dtype)
        init = {k: v.clone() for k, v in ref.state_dict().items()}
        xs, w = _inputs(dtype)
        grad_x = _train(ref, xs, w, 0, WORLD * PER_RANK)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"{dtype}-rank{rank}.pt", weights_only=True)
            assert list(got["state"]) == list(ref.state_dict())  # BatchNorm's keys, in BatchNorm's order
            for k, v in ref.state_dict().items():
                if "running" in k:
                    assert not torch.equal(v, init[k]), k  # the statistics moved
                torch.testing.assert_close(got["state"][k], v, **tol, msg=f"{dtype} {k}")  # stats, counts, weights
            for k, p in ref.named_parameters():  # DDP averages the ranks' gradients of their own mean losses
                torch.testing.assert_close(got["grads"][k], p.grad, **tol, msg=f"{dtype} grad {k}")
            # each rank's loss is the mean over its 8 samples: a sample weighs twice what it weighs in the mean of 16
            torch.testing.assert_close(got["grad_x"], WORLD * grad_x[rank * PER_RANK:(rank + 1) * PER_RANK], **tol)


def test_converted_model_keeps_batchnorm_keys_and_eval():
    torch.manual_seed(0)
    model = create_model("smlpnet_tiny", num_classes=3, img_size=32)
    keys = list(model.state_dict())
    model.train()
    model(torch.randn(4, 3, 32, 32))  # running statistics that are not the initial ones
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    converted = convert_sync_batchnorm(model, "cpu")
    assert converted is model and not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert list(model.state_dict()) == keys
    plain = create_model("smlpnet_tiny", num_classes=3, img_size=32)
    plain.load_state_dict(model.state_dict())  # strict: a --sync-bn checkpoint loads into the plain model
    with torch.no_grad():  # eval (and no process group): plain BatchNorm with the running statistics
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        torch.testing.assert_close(plain.eval()(x), before, rtol=0, atol=0)
    # on cuda / npu: PyTorch's SyncBatchNorm, the same keys (converted here without a GPU: nothing runs)
    native = convert_sync_batchnorm(plain, "cuda")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in native.modules()) and list(native.state_dict()) == keys


@pytest.mark.parametrize("name,kwargs,hint", [
    ("spach_ms_xxs_patch4_224_mlp", {}, False),
    ("shiftvit_light_tiny", {"norm_layer": "GN1"}, True),
])
def test_model_without_batchnorm_is_refused(name, kwargs, hint):
    model = create_model(name, num_classes=3, img_size=32, **kwargs)
    with pytest.raises(SpachError) as e:
        sync_batchnorm(model, name, DistInfo(torch.device("cpu"), rank=0, world_size=2, distributed=True))
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "has no BatchNorm" in msg and "drop --sync-bn" in msg
    assert ("--norm-layer BN" in msg) == hint


def test_converted_shiftvit_is_still_the_batchnorm_variant():
    bn = create_model("shiftvit_light_tiny", num_classes=3, img_size=32, norm_layer="BN")
    gn = create_model("shiftvit_light_tiny", num_classes=3, img_size=32, norm_layer="GN1")
    convert_sync_batchnorm(bn, "cpu")
    # a resume of the wrong variant is still told which variant this model is
    assert "built with norm_layer='BN'" in bn.checkpoint_mismatch_hint(gn.state_dict())
    assert bn.checkpoint_mismatch_hint(create_model("shiftvit_light_tiny", norm_layer="BN").state_dict()) is None


def test_one_process_is_refused(tmp_path):
    data = make_shapes_folder(tmp_path / "shapes", n_train=2, n_val=1)
    r = run_spach("train", *fast_flags(data, tmp_path / "out", "--model", "smlpnet_tiny", "--sync-bn", epochs=1),
                  env={"WORLD_SIZE": "1"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--sync-bn" in lines[0] and "one process" in lines[0] and "torchrun" in lines[0]
    assert not (tmp_path / "out").exists()


def test_ddp_sync_bn_trains_and_saves_plain_keys(tmp_path):
    from test_distributed import _eval_line, torchrun
    data = make_shapes_folder(tmp_path / "shapes", n_train=16, n_val=4)
    out = tmp_path / "ddp"
    r = torchrun("train", *fast_flags(data, out, "--model", "smlpnet_tiny", "--sync-bn", "--model-ema", "--dist-eval",
                                      epochs=1, batch=8))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "--sync-bn: 53 BatchNorm layers normalise over the global batch of 2 processes" in r.stdout
    assert "Accuracy of the EMA model" in r.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    plain = create_model("smlpnet_tiny", num_classes=3, img_size=32)
    for key in ("model", "model_ema"):  # BatchNorm's keys: both load (strictly) into the plain model
        assert list(ckpt[key]) == list(plain.state_dict())
        plain.load_state_dict(ckpt[key])
    # rank 1 evaluated its half with its own running statistics, not averaged before: they equal rank 0's
    single = run_spach("eval", "--checkpoint", out / "checkpoint.pth", "--data-path", data, "--device", "cpu",
                       "--num_workers", "0")
    assert single.returncode == 0, single.stderr
    assert _eval_line(single.stdout) == _eval_line(r.stdout)[:1]
    tracked = [v for k, v in ckpt["model"].items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 3 for v in tracked)  # 48 images / (2 x 8): 3 steps
