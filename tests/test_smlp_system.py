"""sMLPNet through the whole system: spach train (its own drop-path default) / eval / predict / export /
benchmark and the ModelZoo launcher, at 32x32 so that each run takes seconds."""
import json
import os
import re

import pytest
import torch

import spach
from spach.errors import CheckpointError
from spach.cli import main
from train_helpers import fast_flags, make_shapes_folder
from test_launchers import TINY, launch, summary

MODEL = "smlpnet_small"  # drop-path default 0.2 (smlpnet_tiny's is 0.0): the default is visible in the log

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("shapes"), n_train=16, n_val=8)


def _flags(shapes, out, *extra, epochs=3):
    flags = fast_flags(shapes, out, "--model", "smlpnet_tiny", *extra, epochs=epochs)
    i = flags.index("--drop-path")
    return flags[:i] + flags[i + 2:]  # no --drop-path: the model's own default applies


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    import contextlib
    import io
    out = tmp_path_factory.mktemp("smlp_run")
    buf = io.StringIO()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(["train", *_flags(shapes, out)])
    finally:
        torch.set_num_threads(n)
    return rc, out, buf.getvalue()


def test_short_run_learns_and_names_its_drop_path_rate(trained):
    rc, out, stdout = trained
    assert rc == 0
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert max(line["test_acc1"] for line in lines) > 50.0  # chance is 33%
    assert "drop path rate 0 (smlpnet_tiny's own default)" in stdout


def test_drop_path_default_per_model_and_explicit_flag_wins(shapes, tmp_path, capsys):
    from spach.cli import build_parser
    from spach.train.resolve import resolve_config

    def resolved(*argv):
        argv = ["train", *argv, "--device", "cpu"]
        args = build_parser("train").parse_args(argv)
        args._argv = argv
        cfg = resolve_config(args)
        return cfg.model.drop_path, cfg.sources["drop_path"]

    assert resolved("--model", MODEL, "--data-path", shapes) == (0.2, f"{MODEL}'s own default")
    assert resolved("--model", "smlpnet_base") == (0.3, "smlpnet_base's own default")   # demo data too
    assert resolved("--model", MODEL, "--drop-path", "0.05") == (0.05, "command line")
    assert resolved("--model", "spach_ms_s_patch4_224_conv", "--data-path", shapes) == (0.1, "DeiT recipe")
    assert resolved("--data-path", shapes) == (0.1, "DeiT recipe")
    assert resolved("--model", MODEL, "--drop-path", "0.1") == (0.1, "command line")  # the recipe's value, named


def test_eval_predict_and_checkpoint_of_the_run(trained, shapes, tmp_path, capsys):
    _, out, _ = trained
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    assert best["args"]["model"] == "smlpnet_tiny" and "mlp_head.0.weight" in best["model"]
    assert main(["eval", "--checkpoint", str(out / "best.pth"), "--data-path", shapes, "--device", "cpu",
                 "--num_workers", "0"]) == 0
    assert f"* Acc@1 {best['max_accuracy']:.3f}" in capsys.readouterr().out
    image = os.path.join(shapes, "val", "circle", "circle_000.png")
    assert main(["predict", "--checkpoint", str(out / "best.pth"), image, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "smlpnet_tiny" and result["img_size"] == [32, 32]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_round_trips(trained, tmp_path, capsys):
    _, out, _ = trained
    ckpt = out / "best.pth"
    model = spach.create_model("smlpnet_tiny", num_classes=3, img_size=32, checkpoint_path=str(ckpt)).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    # the training checkpoint alone: its 3-class head and its 32x32 training input (sMLPNet takes no other)
    from_file = spach.create_model("smlpnet_tiny", checkpoint_path=str(ckpt)).eval()
    assert from_file.num_classes == 3 and tuple(from_file.img_size) == (32, 32)
    with torch.no_grad():
        assert torch.equal(from_file(x), expected)
    with pytest.raises(CheckpointError, match=r"mlp_head.0.weight \(3, 640\) vs model \(1000, 640\)"):
        spach.create_model("smlpnet_tiny", num_classes=1000, img_size=32, checkpoint_path=str(ckpt))

    st = tmp_path / "w.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--output", str(st)]) == 0
    again = spach.create_model("smlpnet_tiny", checkpoint_path=str(st)).eval()  # sizes from its metadata
    with torch.no_grad():
        assert torch.equal(again(x), expected)

    ts = tmp_path / "m.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--output", str(ts)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), expected, rtol=0, atol=1e-5)

    pytest.importorskip("onnx", reason="spach[export] extra (onnx) not installed")
    ort = pytest.importorskip("onnxruntime", reason="spach[export] extra (onnxruntime) not installed")
    pytest.importorskip("onnxscript", reason="spach[export] extra (onnxscript) not installed")
    onnx_path = tmp_path / "m.onnx"
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--output", str(onnx_path)]) == 0
    assert float(re.search(r"max abs diff vs PyTorch ([0-9.e+-]+)", capsys.readouterr().out).group(1)) < 1e-4
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert (got - expected).abs().max().item() < 1e-4


def test_benchmark_runs_the_family(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert main(["benchmark", "--model", "smlpnet_tiny", "--device", "cpu", "--img-size", "32", "--batch-size", "2",
                 "--steps", "1", "--warmup", "0", "--repeats", "1", "--mode", "both", "--amp", "off",
                 "--num-classes", "10", "--json", str(path)]) == 0
    results = json.loads(path.read_text())["results"]
    assert [r["mode"] for r in results] == ["train", "infer"] and all(r["img_per_s"] > 0 for r in results)


def test_launcher_trains_smlpnet(shapes, request):
    out_id = f"pytest-{os.getpid()}-{request.node.name}"
    try:
        r = launch("train_full_1p.sh", f"--data_path={shapes}", *TINY, "--model=smlpnet_tiny", "--epochs=1",
                   out_id=out_id)
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"^Final Performance images/sec : [0-9.]+$", r.stdout, re.M)
        assert float(summary(out_id, "SPACH_bs16_1p_acc")["ActualFPS"]) > 0
    finally:
        import shutil
        from test_launchers import TEST_DIR
        shutil.rmtree(os.path.join(TEST_DIR, "output", out_id), ignore_errors=True)
