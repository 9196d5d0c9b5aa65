"""`spach predict`: the evaluation transform of the model's pretrained config, the right class (named from
the checkpoint) for images a checkpoint was built to separate, and clear errors that name the bad file."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from PIL import Image

import spach
from spach.cli import main
from spach.inference import ModelInfo, build_model, class_label, eval_transform

NAME = "spach_ms_xxs_patch4_224_conv"
SIZE = 32
COLORS = {"blue": (20, 40, 230), "green": (30, 200, 40), "red": (225, 30, 25)}  # class-index order
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _solid(rgb):
    """The normalised model input of a solid-colour image, computed by hand (not by the code under test)."""
    return torch.stack([torch.full((SIZE, SIZE), (c / 255 - m) / s) for c, m, s in zip(rgb, MEAN, STD)])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training-layout checkpoint whose head is a nearest-class-mean classifier over the pooled features
    of the three colours: a model that really separates blue / green / red images."""
    torch.manual_seed(0)
    model = spach.create_model(NAME, num_classes=len(COLORS), img_size=SIZE).eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(torch.stack([_solid(c) for c in COLORS.values()])),
                                   pre_logits=True)
        # logits_k = -|f - mu_k|^2 / 2 (+ a term shared by all classes), sharpened
        scale = 50.0 / torch.cdist(feats, feats).max().item() ** 2
        model.head.weight.copy_(feats * scale)
        model.head.bias.copy_(-0.5 * (feats ** 2).sum(dim=1) * scale)
    path = tmp_path_factory.mktemp("predict") / "best.pth"
    torch.save({"model": model.state_dict(), "epoch": 9, "class_names": list(COLORS),
                "args": {"model": NAME, "input_size": SIZE, "nb_classes": len(COLORS)}}, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    # other sizes and aspect ratios than the model's input, slightly off the reference colours, JPEG and PNG
    for i, (name, rgb) in enumerate(COLORS.items()):
        shade = tuple(min(255, c + 12) for c in rgb)
        ext = "jpg" if i % 2 else "png"
        paths[name] = folder / f"{name}.{ext}"
        Image.new("RGB", (90 + 30 * i, 60), shade).save(paths[name])
    # a wide image whose centre is green and whose sides are red: the centre crop must see green only
    wide = Image.new("RGB", (200, 100), COLORS["red"])
    wide.paste(Image.new("RGB", (90, 100), COLORS["green"]), (55, 0))
    paths["centre_green"] = folder / "centre_green.png"
    wide.save(paths["centre_green"])
    return paths


def test_eval_transform_follows_the_pretrained_cfg(images):
    info = ModelInfo(NAME, 3, (SIZE, SIZE), pretrained_cfg={"mean": MEAN, "std": STD, "crop_pct": 0.875,
                                                            "interpolation": "bicubic"})
    transform = eval_transform(info)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert transform.transforms[0].size == int(SIZE / 0.875)  # 36 for 32, 256 for 224
    x = transform(Image.open(images["blue"]).convert("RGB"))
    assert x.shape == (3, SIZE, SIZE)
    expected = _solid(tuple(min(255, c + 12) for c in COLORS["blue"]))
    assert (x - expected).abs().max().item() < 0.05  # JPEG / PNG of a solid colour: its normalised value


def test_predict_names_the_right_class(checkpoint, images, capsys):
    paths = [str(images[k]) for k in ("red", "green", "blue", "centre_green")]
    # --model left out: the checkpoint's args name it; input size comes from the checkpoint too
    assert main(["predict", "--checkpoint", str(checkpoint), *paths, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == NAME and out["img_size"] == [SIZE, SIZE]
    got = {r["image"]: r["predictions"] for r in out["results"]}
    for key, expected in (("red", "red"), ("green", "green"), ("blue", "blue"), ("centre_green", "green")):
        preds = got[str(images[key])]
        assert len(preds) == 3  # --topk 5 is capped at the number of classes
        assert preds[0]["class_name"] == expected, (key, preds)
        assert preds[0]["class_index"] == list(COLORS).index(expected)
        assert preds[0]["probability"] > 0.5
        assert abs(sum(p["probability"] for p in preds) - 1) < 1e-4
        assert [p["rank"] for p in preds] == [1, 2, 3]

    # the human-readable form, top-1 only
    assert main(["predict", "--model", NAME, "--checkpoint", str(checkpoint), str(images["red"]), "--topk", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(images["red"]) and len(lines) == 2
    assert lines[1].split()[0] == "1." and lines[1].endswith("red") and "class 2" in lines[1]


def test_weights_given_as_urls(checkpoint, images, tmp_path, capsys, monkeypatch):
    """--checkpoint takes an http(s) URL (downloaded once into torch hub's cache, one folder per URL, so two
    different best.pth files never stand in for each other) or a file:// URL (its path, nothing copied)."""
    from train_helpers import serve_folder
    from spach.weights import local_weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "best.pth").write_bytes(b"another file of the same name")
    with serve_folder(checkpoint.parent) as base, serve_folder(other) as base2:
        url = f"{base}/best.pth"
        assert main(["predict", "--checkpoint", url, str(images["red"]), "--topk", "1"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[1].endswith("red")
        first, second = local_weights(url), local_weights(f"{base2}/best.pth")
    assert first != second and os.path.basename(first) == os.path.basename(second) == "best.pth"
    assert open(first, "rb").read() == checkpoint.read_bytes()
    assert open(second, "rb").read() == b"another file of the same name"
    assert local_weights(url) == first  # cached: the server is gone
    assert local_weights(checkpoint.as_uri()) == str(checkpoint)
    assert local_weights(str(checkpoint)) == str(checkpoint)


def test_imagenet_heads_get_imagenet_names_and_other_heads_indices():
    if not hasattr(pytest.importorskip("timm.data"), "ImageNetInfo"):
        pytest.skip("this timm has no offline ImageNet class tables (timm.data.ImageNetInfo)")
    assert class_label(ModelInfo(NAME, 1000, (224, 224)), 1).startswith("goldfish")
    assert class_label(ModelInfo(NAME, 10, (224, 224)), 1) is None
    assert class_label(ModelInfo(NAME, 2, (224, 224), class_names=["a", "b"]), 1) == "b"


def test_build_model_reads_size_and_classes_from_a_bare_state_dict(tmp_path):
    # a bare state_dict says nothing but its head shape: num_classes comes from it, the size from --img-size
    model = spach.create_model(NAME, num_classes=7, img_size=SIZE)
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)
    built, info = build_model(NAME, str(path), img_size=SIZE)
    assert info.num_classes == 7 and info.img_size == (SIZE, SIZE) and info.class_names is None
    assert not built.training


def test_use_ema_and_ddp_prefixed_checkpoints(tmp_path):
    model = spach.create_model(NAME, num_classes=4, img_size=SIZE)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "ck.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "model_ema": ema,
                "args": {"model": NAME, "input_size": SIZE}}, path)
    built, info = build_model(None, str(path))
    assert info.num_classes == 4 and torch.equal(built.head.bias, model.head.bias)
    built, _ = build_model(None, str(path), use_ema=True)
    assert torch.equal(built.head.bias, ema["head.bias"])


def test_crop_pct_comes_from_the_training_run(tmp_path):
    model = spach.create_model(NAME, num_classes=2, img_size=SIZE)
    path = tmp_path / "ck.pth"
    torch.save({"model": model.state_dict(), "args": {"model": NAME, "input_size": SIZE, "crop_pct": 1.0}}, path)
    _, info = build_model(None, str(path))
    assert info.pretrained_cfg["crop_pct"] == 1.0 and eval_transform(info).transforms[0].size == SIZE
    _, info = build_model(None, str(path), crop_pct=0.5)  # --crop-pct wins
    assert eval_transform(info).transforms[0].size == 2 * SIZE


def test_trained_checkpoint_end_to_end(tmp_path, capsys):
    """`spach train` 3 steps on a trivially separable colour set, then predict with its checkpoint (and
    with its safetensors export), and plot its log."""
    for split, n in (("train", 12), ("val", 2)):
        for name, rgb in COLORS.items():
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                jitter = tuple(max(0, min(255, c + (7 * i) % 31 - 15)) for c in rgb)
                Image.new("RGB", (40 + 3 * i, 36), jitter).save(tmp_path / "data" / split / name / f"{i}.png")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "spach", "train", "--data-path", str(tmp_path / "data"), "--model", NAME,
         "--input-size", str(SIZE), "--epochs", "1", "--batch-size", "12", "--output_dir", str(out),
         "--device", "cpu", "--num_workers", "0", "--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0",
         "--no-model-ema", "--no-repeated-aug", "--warmup-epochs", "0", "--lr", "0.1", "--seed", "0"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = out / "checkpoint.pth"
    val = sorted((tmp_path / "data" / "val").glob("*/*.png"))
    assert main(["predict", "--checkpoint", str(ckpt), *map(str, val), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    for res in results:
        assert res["predictions"][0]["class_name"] == pathlib.Path(res["image"]).parent.name, res
        assert res["predictions"][0]["probability"] > 0.5, res

    st = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--output", str(st)]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(st), *map(str, val), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == results  # same names, same probabilities

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # spach[plot] not installed: test_plot.py covers plotting where it is
    assert main(["plot", str(out), "--output", str(tmp_path / "curves.png")]) == 0
    assert "out: 1 epoch (last 0)" in capsys.readouterr().out
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_bad_image_is_one_clear_line_naming_it(checkpoint, images, tmp_path):
    """Alone, a bad image is the error; among others it is one warning naming it, the others are predicted, and
    the run ends with an error that counts it (exit 2)."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    command = [sys.executable, "-m", "spach", "predict", "--checkpoint", str(checkpoint)]
    proc = subprocess.run(command + [str(broken)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spach: error: cannot read image ") and str(broken) in lines[0]

    proc = subprocess.run(command + [str(images["red"]), str(broken), str(images["blue"])], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("spach: warning: cannot read image ") and str(broken) in lines[0]
    assert lines[0].endswith("not an image format Pillow knows; skipped")
    assert lines[1] == "spach: error: 1 of 3 images could not be read (each named above)"
    shown = proc.stdout.splitlines()
    assert [line for line in shown if not line.startswith(" ")] == [str(images["red"]), str(images["blue"])]


def test_predict_errors(checkpoint, images, tmp_path, capsys):
    missing = tmp_path / "missing.png"
    assert main(["predict", "--checkpoint", str(checkpoint), str(missing)]) == 2
    assert f"image {missing} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--checkpoint", str(checkpoint), str(empty)]) == 2  # a folder is walked: no images
    assert f"no images in {empty}: pass image files (.jpg, .jpeg, .png ...)" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(checkpoint), str(images["red"]), "--topk", "0"]) == 2
    assert "--topk must be at least 1" in capsys.readouterr().err
    assert main(["predict", str(images["red"])]) == 2  # neither --model nor a checkpoint naming one
    assert "pass --model NAME" in capsys.readouterr().err


# --- folders, patterns, output files ---------------------------------------------------------------------

def _colour_tree(root, per_colour=2, size=(8, 8)):
    """root/<colour>/<i>.png (and a nested root/<colour>/deeper/<i>.png): each image's class is its folder's
    colour. Returns the image paths in the order a walk gives them."""
    paths = []
    for name, rgb in sorted(COLORS.items()):
        (root / name / "deeper").mkdir(parents=True)
        for folder in (root / name, root / name / "deeper"):  # a folder's files first, then its sub-folders
            for i in range(per_colour):
                Image.new("RGB", size, rgb).save(folder / f"{i}.png")
                paths.append(str(folder / f"{i}.png"))
    return paths


def _colour_of(path):
    return next(part for part in pathlib.Path(path).parts if part in COLORS)


def test_folders_are_walked_for_image_files_only(checkpoint, tmp_path, capsys):
    """A folder is walked depth first in name order for image files; other files, hidden files, FIFOs named
    like images and a link cycle are left out (the FIFO and the cycle with one warning line each)."""
    root = tmp_path / "photos"
    expected = _colour_tree(root)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    os.mkfifo(root / "blue" / "pipe.png")
    os.symlink("..", root / "red" / "deeper" / "loop")  # a cycle back to photos/
    assert main(["predict", "--checkpoint", str(checkpoint), str(root), "--json", "-j", "0"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)["results"]
    assert [r["image"] for r in results] == expected
    for r in results:
        assert r["predictions"][0]["class_name"] == _colour_of(r["image"]), r
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2, warnings
    assert "skipped 1 special files named like images (FIFO, socket, device): never opened" in warnings[0]
    assert str(root / "blue" / "pipe.png") in warnings[0]
    assert "skipped 1 folder links to a folder already walked (a cycle" in warnings[1]


def test_quoted_patterns_are_expanded(checkpoint, tmp_path, capsys):
    """'photos/**/*.png' works when the shell did not expand it; a file really named with glob characters is
    that file; a pattern matching nothing is one line."""
    root = tmp_path / "photos"
    tree = _colour_tree(root)
    odd = root / "red[1].png"
    Image.new("RGB", (8, 8), COLORS["red"]).save(odd)
    os.mkfifo(root / "pipe.png")  # matched, never opened
    pattern = str(root / "**" / "*.png")
    assert main(["predict", "--checkpoint", str(checkpoint), pattern, str(odd), "--json", "-j", "0"]) == 0
    captured = capsys.readouterr()
    fifo = root / "pipe.png"
    assert captured.err == f"spach: warning: {fifo} is a FIFO (named pipe), not a file: skipped (never opened)\n"
    results = json.loads(captured.out)["results"]
    assert sorted(r["image"] for r in results) == sorted(tree + [str(odd)])  # odd once: matched, then named
    assert len(results) == len(tree) + 1

    nothing = str(root / "**" / "*.webp")
    assert main(["predict", "--checkpoint", str(checkpoint), nothing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no file matches {nothing}" in err


def _read_csv(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_output_csv_and_json(checkpoint, tmp_path, capsys):
    """--output F.csv has timm inference.py's columns; F.json is the list of records --json prints. Beyond 20
    images the table gives way to one summary line; worker processes give the same predictions."""
    root = tmp_path / "photos"
    paths = _colour_tree(root, per_colour=4)  # 24 images: more than the table shows
    argv = ["predict", "--checkpoint", str(checkpoint), str(root), "-b", "5"]
    assert main(argv + ["--json", "-j", "0"]) == 0
    records = json.loads(capsys.readouterr().out)["results"]

    out_csv = tmp_path / "p.csv"
    assert main(argv + ["--topk", "2", "--output", str(out_csv), "-j", "2"]) == 0
    assert capsys.readouterr().out == f"wrote 24 predictions to {out_csv}\n"
    rows = _read_csv(out_csv)
    assert rows[0] == ["filename", "index_0", "index_1", "label_0", "label_1", "prob_0", "prob_1"]
    assert [r[0] for r in rows[1:]] == paths
    for row, rec in zip(rows[1:], records):
        top = rec["predictions"]
        assert row[1:] == [str(top[0]["class_index"]), str(top[1]["class_index"]), top[0]["class_name"],
                           top[1]["class_name"], repr(top[0]["probability"]), repr(top[1]["probability"])]
        assert row[3] == _colour_of(row[0])

    out_json = tmp_path / "p.json"
    assert main(argv + ["--output", str(out_json), "-j", "0"]) == 0
    assert json.loads(out_json.read_text()) == records  # --topk 5: capped at the 3 classes, as --json gives
    capsys.readouterr()
    # a few images: the table as well as the file
    assert main(["predict", "--checkpoint", str(checkpoint), paths[0], "--output", str(out_csv)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == paths[0] and out[-1] == f"wrote 1 prediction to {out_csv}"
    assert len(_read_csv(out_csv)) == 2 and os.stat(out_csv).st_mode & 0o644 == 0o644
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


def test_bad_output_paths_are_one_line_before_the_model_is_built(checkpoint, images, tmp_path, capsys):
    """Each names the path and the fix, and comes before the checkpoint is read (a missing one here)."""
    (tmp_path / "file").write_text("")
    missing_ckpt = str(tmp_path / "nowhere.pth")
    cases = [(tmp_path, "is a folder: pass a file path, e.g. --output " + str(tmp_path / "predictions.csv")),
             (tmp_path / "no" / "p.csv", f"{tmp_path / 'no'} does not exist; create the folder (mkdir -p"),
             (tmp_path / "file" / "p.csv", f"{tmp_path / 'file'} is a regular file, not a folder"),
             (tmp_path / "p.txt", "name a .csv or .json file")]
    for output, words in cases:
        assert main(["predict", "--checkpoint", missing_ckpt, str(images["red"]), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(output) in err and words in err, err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_read_only_output_folder_is_one_line(checkpoint, images, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user can write in a read-only folder (root)")
        output = folder / "p.csv"
        assert main(["predict", "--checkpoint", str(checkpoint), str(images["red"]), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot write --output {output}: {folder} is not writable" in err
    finally:
        folder.chmod(0o755)


def test_output_is_replaced_whole_or_not_at_all(checkpoint, images, tmp_path, capsys):
    """A failed run leaves an older file as it was and no temporary file; a link at the output path is replaced
    by the new file, and what it pointed to is untouched."""
    output = tmp_path / "p.csv"
    output.write_text("older results\n")
    assert main(["predict", "--checkpoint", str(checkpoint), str(images["red"]), str(tmp_path / "gone.png"),
                 "--output", str(output)]) == 2
    assert "gone.png does not exist" in capsys.readouterr().err
    assert output.read_text() == "older results\n" and sorted(os.listdir(tmp_path)) == ["p.csv"]

    target = tmp_path / "elsewhere.csv"
    target.write_text("not ours\n")
    link = tmp_path / "link.csv"
    os.symlink(target, link)
    assert main(["predict", "--checkpoint", str(checkpoint), str(images["red"]), "--output", str(link)]) == 0
    assert not link.is_symlink() and _read_csv(link)[1][0] == str(images["red"])
    assert target.read_text() == "not ours\n"


def test_unreadable_images_in_a_folder_are_counted(checkpoint, tmp_path, capsys):
    root = tmp_path / "photos"
    paths = _colour_tree(root)
    (root / "green" / "0.png").write_bytes(b"\x89PNG truncated")
    (root / "red" / "1.png").write_bytes(b"")
    output = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), str(root), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.endswith("; skipped") for line in err[:2])
    assert err[2] == f"spach: error: 2 of 12 images could not be read (each named above); the other 10 are in {output}"
    rows = _read_csv(output)[1:]
    assert [r[0] for r in rows] == [p for p in paths if not p.endswith(("green/0.png", "red/1.png"))]


def _peak_growth_kb(run) -> int:
    """How far this process's peak resident memory rises above its current size while ``run()`` runs (Linux:
    writing 5 to /proc/self/clear_refs resets the peak)."""
    def status(key):
        with open("/proc/self/status") as f:
            return int(f.read().split(key + ":")[1].split()[0])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    run()
    return status("VmHWM") - before


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Predicting 400 images into a CSV peaks no higher than predicting 50: images are read a batch ahead of the
    model, and rows go to the file as they come. Holding the inputs instead (as predict did) would add ~70 MB
    (350 more inputs of 3x128x128 floats). The model is a pooling layer: it is not what could grow, and a real
    one would make the test minutes long."""
    from spach.commands.predict import ResultsFile
    from spach.inference import ModelInfo, predict_batches
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(folder / f"{i:04d}.png")
    paths = sorted(str(p) for p in folder.iterdir())
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3)).eval()
    info = ModelInfo("pool", 3, (128, 128), class_names=["a", "b", "c"])

    def predict(n):
        with ResultsFile(str(tmp_path / f"{n}.csv")) as out:
            out.start(3)
            for records, unreadable in predict_batches(model, info, paths[:n], batch_size=16):
                assert not unreadable
                out.add(records)
            out.commit()

    few = _peak_growth_kb(lambda: predict(50))
    many = _peak_growth_kb(lambda: predict(400))
    assert len(_read_csv(tmp_path / "400.csv")) == 401
    assert many - few < 20 * 1024, (few, many)  # KB
