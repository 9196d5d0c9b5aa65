"""`spach export`: ONNX matches PyTorch under onnxruntime, safetensors round-trips exactly through
spach.create_model, TorchScript matches; mistakes end in one clear line and exit code 2."""
import json
import re
import subprocess
import sys

import pytest
import torch

import spach
from spach.cli import main
from train_helpers import randomise_head

NAME = "spach_ms_xxs_patch4_224_conv"
CLASSES = ["cat", "dog", "fish"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A training-layout checkpoint: 3 classes, 32x32 inputs, class names, args naming the model."""
    torch.manual_seed(0)
    model = randomise_head(spach.create_model(NAME, num_classes=3, img_size=32))
    path = tmp_path_factory.mktemp("export") / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 4, "class_names": CLASSES,
                "args": {"model": NAME, "input_size": 32, "nb_classes": 3, "lr": 5e-4}}, path)
    return model, path


def _inputs(batch, size=32, seed=3):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_onnx_export_matches_pytorch_with_dynamic_batch(trained, tmp_path, capsys):
    pytest.importorskip("onnx", reason="spach[export] extra (onnx) not installed")
    ort = pytest.importorskip("onnxruntime", reason="spach[export] extra (onnxruntime) not installed")
    pytest.importorskip("onnxscript", reason="spach[export] extra (onnxscript) not installed")
    model, ckpt = trained
    out = tmp_path / "model.onnx"
    # no --model: the checkpoint's args name it
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    diff = float(re.search(r"max abs diff vs PyTorch ([0-9.e+-]+)", printed).group(1))
    assert diff < 1e-4
    assert out.is_file() and not (tmp_path / "model.onnx.data").exists()  # one self-contained file

    # run the file ourselves at a batch size the export never saw
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _inputs(5)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    assert got.shape == (5, 3)
    assert (got - expected).abs().max().item() < 1e-4
    assert expected.std().item() > 0.1  # the comparison is not between constant outputs

    import onnx
    props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert props["spach.model"] == NAME and props["spach.class_names"] == CLASSES
    assert props["spach.img_size"] == [32, 32]


def test_onnx_older_opset_uses_the_torchscript_exporter(trained, tmp_path, capsys):
    pytest.importorskip("onnx", reason="spach[export] extra (onnx) not installed")
    pytest.importorskip("onnxruntime", reason="spach[export] extra (onnxruntime) not installed")
    _, ckpt = trained
    out = tmp_path / "opset17.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--opset", "17", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exported ONNX (opset 17, dynamic batch axis)" in printed
    assert float(re.search(r"max abs diff vs PyTorch ([0-9.e+-]+)", printed).group(1)) < 1e-4


def test_safetensors_round_trips_to_identical_logits(trained, tmp_path):
    model, ckpt = trained
    out = tmp_path / "weights.safetensors"
    assert main(["export", "--model", NAME, "--checkpoint", str(ckpt), "--format", "safetensors",
                 "--output", str(out)]) == 0
    reloaded = spach.create_model(NAME, checkpoint_path=str(out), num_classes=3, img_size=32).eval()
    x = _inputs(4)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))

    from spach.inference import build_model
    from spach.weights import safetensors_metadata
    meta = safetensors_metadata(str(out))
    assert meta["model"] == NAME and meta["num_classes"] == 3 and meta["img_size"] == [32, 32]
    assert meta["class_names"] == CLASSES and meta["spach_version"] == spach.__version__
    # the metadata alone is enough to rebuild the model: no --model, no sizes
    rebuilt, info = build_model(None, str(out))
    assert info.class_names == CLASSES and info.img_size == (32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_release_layout_exports_to_safetensors_that_create_model_loads_as_is(tmp_path):
    # an official-release-shaped file ({'model': sd}, 1000 classes, 224): create_model needs no extra kwargs
    name = "spach_ms_xxs_patch4_224_attn"
    model = randomise_head(spach.create_model(name), seed=1)
    release = tmp_path / "release.pth"
    torch.save({"model": model.state_dict()}, release)
    assert main(["export", "--model", name, "--checkpoint", str(release), "--format", "safetensors"]) == 0
    out = tmp_path / "release.safetensors"  # default output: beside the checkpoint
    reloaded = spach.create_model(name, checkpoint_path=str(out)).eval()
    x = _inputs(1, size=224)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_matches_pytorch(trained, tmp_path, capsys):
    model, ckpt = trained
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--output", str(out)]) == 0
    assert "torch.jit.script" in capsys.readouterr().out
    files = {"spach.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=files)
    x = _inputs(3)
    with torch.no_grad():  # the graph and eager inference (outside packed_weights) run the same plain layers
        assert torch.equal(loaded(x), model(x))
    assert json.loads(files["spach.json"])["class_names"] == CLASSES


def test_export_of_missing_checkpoint_is_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere.pth"
    proc = subprocess.run([sys.executable, "-m", "spach", "export", "--model", NAME, "--checkpoint", str(missing),
                           "--format", "safetensors"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spach: error: ") and str(missing) in lines[0]
    assert "Traceback" not in proc.stderr


def test_export_errors(trained, tmp_path, capsys, monkeypatch):
    _, ckpt = trained
    # the wrong architecture for the checkpoint
    assert main(["export", "--model", "spach_ms_xxs_patch4_224_attn", "--checkpoint", str(ckpt),
                 "--format", "safetensors", "--output", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "does not fit model spach_ms_xxs_patch4_224_attn" in err
    # an unknown name suggests close ones
    assert main(["export", "--model", "spach_ms_xxs_patch4_224_cnv", "--format", "safetensors"]) == 2
    assert "did you mean spach_ms_xxs_patch4_224_conv" in capsys.readouterr().err
    # never overwrite the input
    st = tmp_path / "w.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--output", str(st)]) == 0
    assert main(["export", "--checkpoint", str(st), "--format", "safetensors", "--output", str(st)]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err
    # a failed check leaves nothing behind and keeps an older file of that name
    st.write_bytes(b"older export")
    with monkeypatch.context() as m:
        m.setattr(torch, "equal", lambda a, b: False)
        assert main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--output", str(st)]) == 2
    assert "safetensors check failed" in capsys.readouterr().err
    assert st.read_bytes() == b"older export" and sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    # --opset only means something for ONNX
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--opset", "17"]) == 2
    assert "--opset applies to --format onnx only" in capsys.readouterr().err
    # ONNX without its optional dependencies: the install command, before any work
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx"]) == 2
    assert "pip install 'spach[export]'" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_falls_back_to_tracing_with_a_note(trained, tmp_path, capsys, monkeypatch):
    model, ckpt = trained

    def no_script(*args, **kwargs):
        raise RuntimeError("unsupported construct")

    monkeypatch.setattr(torch.jit, "script", no_script)
    out = tmp_path / "traced.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "torch.jit.script failed (RuntimeError: unsupported construct); tracing" in printed
    monkeypatch.undo()
    loaded = torch.jit.load(str(out))
    x = _inputs(4)  # another batch size than the trace's example
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
