"""One weights reader (`spach.weights.open_weights`) for every way a model is built, and `spach export --format hf`:
a folder in timm's Hugging Face layout that timm (`local-dir:`), spach.create_model, spach predict and `hf-hub:`
ids (through huggingface_hub's cache, offline) load to the checkpoint's exact logits, with a model card."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from PIL import Image

import spach
import spach.weights
from spach.cli import main
from spach.errors import CheckpointError
from spach.weights import open_weights
from train_helpers import make_shapes_folder, randomise_head

NAME = "spach_ms_xxs_patch4_224_conv"
CLASSES = ["circle", "cross", "square"]


def _x(size=32, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch training run: its data, checkpoint.pth (args, class names, max_accuracy, log_stats) and
    log.txt; the model it holds."""
    root = tmp_path_factory.mktemp("hf")
    data = make_shapes_folder(root / "shapes", n_train=3, n_val=2, size=8, classes=CLASSES)
    torch.manual_seed(0)
    model = randomise_head(spach.create_model(NAME, num_classes=3, img_size=32))
    out = root / "run"
    out.mkdir()
    epochs = [{"train_loss": 1.1, "test_loss": 0.9, "test_acc1": 50.0, "test_acc5": 100.0, "epoch": 0},
              {"train_loss": 0.7, "test_loss": 0.6, "test_acc1": 83.33, "test_acc5": 100.0, "epoch": 1},
              {"train_loss": 0.5, "test_loss": 0.7, "test_acc1": 66.67, "test_acc5": 100.0, "epoch": 2}]
    (out / "log.txt").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    args = {"model": NAME, "input_size": 32, "crop_pct": 1.0, "nb_classes": 3, "lr": 5e-4, "epochs": 3,
            "data_path": data, "data_set": "IMNET", "batch_size": 16}
    torch.save({"model": model.state_dict(), "model_ema": None, "epoch": 2, "class_names": CLASSES, "args": args,
                "max_accuracy": 83.33, "log_stats": epochs[-1], "optimizer": {"state": {}}}, out / "checkpoint.pth")
    return model, str(out / "checkpoint.pth"), data


@pytest.fixture(scope="module")
def folder(run, tmp_path_factory):
    _, ckpt, _ = run
    path = str(tmp_path_factory.mktemp("export") / "my-model")
    assert main(["export", "--checkpoint", ckpt, "--format", "hf", "--output", path]) == 0
    return path


# --- the weights file object -------------------------------------------------------------------------------------
def test_weights_file_is_read_once_and_holds_facts_args_and_weights(run, monkeypatch):
    model, ckpt, _ = run
    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    weights = open_weights(ckpt)
    assert weights.facts == {"model": NAME, "img_size": (32, 32), "crop_pct": 1.0, "num_classes": 3,
                             "class_names": CLASSES, "epoch": 2}
    assert weights.args["lr"] == 5e-4 and weights.contents["max_accuracy"] == 83.33
    assert weights.tensor_shape("head.weight") == (3, 512)
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        weights.state_dict(use_ema=True)
    built = spach.create_model(NAME, checkpoint_path=weights).eval()  # shape, options, weights: from the object
    from spach.inference import build_model
    _, info = build_model(None, weights)
    assert loads == [ckpt] and info.class_names == CLASSES and info.img_size == (32, 32)
    with torch.no_grad():
        assert torch.equal(built(_x()), model(_x()))
    assert open_weights(weights) is weights


def test_damaged_facts_are_refused_when_the_file_is_opened(tmp_path):
    path = tmp_path / "damaged.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": {"model": NAME, "input_size": 10 ** 6}}, path)
    with pytest.raises(CheckpointError, match="input_size 1000000 is not an input size"):
        open_weights(path)


def test_variant_options_are_declared_by_the_families():
    from spach.models import arch_options, variant_options
    from spach.models.base import FAMILY_OPTIONS
    assert spach.weights.ARCH_OPTIONS == arch_options()
    assert set(arch_options()) == {o for f in FAMILY_OPTIONS.values() for o in f.recorded}
    assert {"stem_type", "norm_layer", "act_layer"} <= set(arch_options())
    assert variant_options("shiftvit_light_tiny")["act_layer"] == ("GELU", ("GELU", "RELU"))
    assert variant_options(NAME) == {}


# --- the exported folder -----------------------------------------------------------------------------------------
def test_hf_folder_rebuilds_the_checkpoints_logits_in_spach_and_timm(run, folder):
    model, _, _ = run
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["architecture"] == NAME and config["num_classes"] == 3 and config["label_names"] == CLASSES
    assert config["model_args"] == {"img_size": 32}
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["crop_pct"] == 1.0 and cfg["mean"] == [0.485, 0.456, 0.406]
    assert "url" not in cfg and "file" not in cfg  # the release's location is not these weights'
    x = _x()
    with torch.no_grad():
        expected = model(x)
        for built in (spach.create_model(NAME, checkpoint_path=folder), spach.create_model("local-dir:" + folder),
                      timm.create_model("local-dir:" + folder, pretrained=True)):
            assert torch.equal(built.eval()(x), expected)
    weights = open_weights(folder)
    assert weights.path.endswith("model.safetensors") and weights.args is None
    assert weights.facts["class_names"] == CLASSES and weights.facts["img_size"] == (32, 32)


def test_model_card_says_what_the_model_is_its_data_config_results_license_and_citation(run, folder):
    _, _, data = run
    card = open(os.path.join(folder, "README.md")).read()
    assert card.startswith("---\nlicense: mit\nlibrary_name: timm\n")
    assert f"# {NAME}" in card and "A Battle of Network Structures" in card and "arXiv:2108.13002" in card
    params = sum(p.numel() for p in run[0].parameters()) / 1e6
    flops = spach.count_flops(run[0], (32, 32)) / 1e9
    assert f"Parameters: {params:.2f} M" in card and f"GFLOPs: {flops:.3f}" in card
    assert "Images: 9 train, 6 validation" in card and "`circle`, `cross`, `square`" in card
    assert f'"data_path": "{data}"' in card and '"lr": 0.0005' in card  # the resolved training flags
    assert "| final | 3 | 66.67 | 100.00 | 0.70 |" in card  # log.txt's last line
    assert "| best | 2 | 83.33 | 100.00 | 0.60 |" in card  # its best line
    assert "**83.33%**" in card and "epoch 3 (of 3 logged)" in card
    assert "EMA" not in card  # no column for what the run did not measure
    assert "## License\n\nMIT" in card and "@article{zhao2021battle" in card


def test_predict_and_eval_read_the_folder(folder, run, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    assert main(["predict", "--checkpoint", folder, str(image), "--json", "--topk", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == NAME and out["num_classes"] == 3
    assert sorted(p["class_name"] for p in out["results"][0]["predictions"]) == CLASSES
    # spach eval reads the folder's weights file (the model and input size as flags)
    _, _, data = run
    assert main(["eval", "--checkpoint", folder, "--model", NAME, "--input-size", "32", "--data-path", data,
                 "--device", "cpu", "--batch-size", "8", "--num_workers", "0"]) == 0


def test_export_hf_refuses_what_it_would_overwrite(run, folder, tmp_path, capsys):
    _, ckpt, _ = run
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    file = tmp_path / "file"
    file.write_text("x")
    for output, words in ((other, "holding other files"), (file, "writes a folder")):
        assert main(["export", "--checkpoint", ckpt, "--format", "hf", "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
    assert (other / "todo.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="is a folder without config.json"):
        open_weights(other)


def test_a_shiftvit_variant_survives_the_folder(tmp_path):
    torch.manual_seed(1)
    model = spach.create_model("shiftvit_light_tiny", num_classes=2, img_size=32, norm_layer="BN",
                               act_layer="RELU").eval()
    ckpt = tmp_path / "shift.pth"
    torch.save({"model": model.state_dict(), "args": {"model": "shiftvit_light_tiny", "input_size": 32,
                                                      "norm_layer": "BN", "act_layer": "RELU"}}, ckpt)
    out = str(tmp_path / "shift-hf")
    # (the export itself checks that spach and timm rebuild the exact logits from the folder)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "hf", "--output", out]) == 0
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_args"] == {"img_size": 32, "norm_layer": "BN", "act_layer": "RELU"}
    weights = open_weights(out)
    assert weights.options() == {"norm_layer": "BN", "act_layer": "RELU"}


# --- hf-hub: ids ---------------------------------------------------------------------------------------------------
def _hub_cache(root, repo, folder) -> str:
    """The folder laid out as huggingface_hub caches a repo: models--ORG--NAME/{refs/main, snapshots/<commit>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = os.path.join(root, "hub", "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as src, open(os.path.join(snapshot, name), "wb") as dst:
            dst.write(src.read())
    return os.path.join(root, "hub")


def test_hf_hub_ids_load_from_the_cache_offline(run, folder, tmp_path):
    model, _, _ = run
    hub = _hub_cache(str(tmp_path), "my-org/spach-shapes", folder)
    x = _x()
    with torch.no_grad():
        torch.save({"x": x, "logits": model(x)}, tmp_path / "expected.pt")
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(image)
    script = textwrap.dedent(f"""
        import json, torch, timm, spach
        from spach.cli import main
        ref = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            for m in (spach.create_model("hf-hub:my-org/spach-shapes"),
                      spach.create_model({NAME!r}, checkpoint_path="hf-hub:my-org/spach-shapes"),
                      timm.create_model("hf-hub:my-org/spach-shapes", pretrained=True)):
                assert torch.equal(m.eval()(ref["x"]), ref["logits"])
        assert main(["predict", "--checkpoint", "hf-hub:my-org/spach-shapes", {str(image)!r}, "--json"]) == 0
        try:
            spach.create_model("hf-hub:my-org/missing")
        except spach.CheckpointError as e:
            print("MISSING:", e)
        """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=hub, HF_HOME=str(tmp_path / "home"))
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"model": "spach_ms_xxs_patch4_224_conv"' in proc.stdout and '"class_name": "circle"' in proc.stdout
    missing = [ln for ln in proc.stdout.splitlines() if ln.startswith("MISSING:")]
    assert len(missing) == 1 and "cannot get hf-hub:my-org/missing from the Hugging Face Hub" in missing[0]


def test_hf_hub_without_huggingface_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(CheckpointError) as e:
        open_weights("hf-hub:my-org/spach-shapes")
    assert "pip install 'spach[hf]'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="is not a Hugging Face model id"):
        open_weights("hf-hub:not an id")


def test_push_without_a_token_is_one_line(folder, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", folder, "--repo", "my-org/spach-shapes"]) == 2
    err = capsys.readouterr().err
    assert "needs a Hugging Face token" in err and "HF_TOKEN" in err and err.count("\n") == 1
