"""The run's configuration: resolved once from flags and --config files, frozen, written as config.yaml, and
read back to rerun the same run."""
import dataclasses
import os

import pytest
import torch

from spach.cli import build_parser, main
from spach.errors import SpachError
from spach.train.config import RESUME_IDENTITY, RunConfig
from spach.train.resolve import resolve_config
from train_helpers import fast_flags, make_shapes_folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("cfgdata") / "shapes", n_train=16, n_val=6)


def _resolve(*argv, command="train"):
    argv = [command, *argv]
    args = build_parser(command).parse_args(argv)
    args._argv = argv
    return resolve_config(args, "eval" if command == "eval" else "train")


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_config_is_frozen_and_every_flag_has_one_home(shapes):
    cfg = _resolve("--data-path", shapes, "--device", "cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim = None
    with pytest.raises(TypeError):
        cfg.sources["lr"] = "me"
    # every flag of `spach train` is one field of exactly one section, under its original dest name
    fields = {}
    for key, section in cfg.sections():
        for f in dataclasses.fields(section):
            assert f.name not in fields, f"{f.name} in {fields.get(f.name)} and {key}"
            fields[f.name] = key
    parser = build_parser("train")
    dests = {a.dest for sub in parser._subparsers._group_actions for p in sub.choices.values() for a in p._actions}
    dests -= {"help", "config", "version", "command"}
    assert dests <= set(fields), dests - set(fields)
    for dotted in RESUME_IDENTITY:
        cfg.get(dotted)  # each identity field exists


def test_recipe_defaults_lr_scaling_and_where_values_came_from(shapes):
    cfg = _resolve("--data-path", shapes, "--device", "cpu", "--batch-size", "64", "--lr", "1e-3")
    assert (cfg.optim.epochs, cfg.sources["epochs"]) == (300, "DeiT recipe")
    assert (cfg.optim.lr, cfg.optim.global_batch, cfg.optim.effective_lr) == (1e-3, 64, 1e-3 * 64 / 512)
    assert cfg.sources["lr"] == cfg.sources["batch_size"] == "command line"
    assert cfg.device.kind == "cpu" and cfg.device.amp in ("bf16", "off")
    assert cfg.output.output_dir == os.path.join("output", f"{cfg.model.model}-shapes")
    demo = _resolve("--device", "cpu")
    assert (demo.optim.epochs, demo.sources["epochs"], demo.data.input_size) == (10, "demo default", 32)
    args = demo.checkpoint_args()  # as the original main.py saves them: lr is the scaled rate
    assert args["lr"] == demo.optim.effective_lr and args["base_lr"] == demo.optim.lr
    assert args["model"] == demo.model.model and "global_batch" not in args


def test_config_files_merge_in_order_and_flags_win(shapes, tmp_path):
    flat = _write(tmp_path / "a.yaml", "batch_size: 32\nepochs: 7\nlr: 1.0e-3\nopt-betas: [0.9, 0.95]\n")
    sectioned = _write(tmp_path / "b.yaml", "optim:\n  epochs: 9\naug:\n  mixup: 0.2\n  scale: [0.5, 1.0]\n")
    cfg = _resolve("--data-path", shapes, "--device", "cpu", "--config", flat, "--config", sectioned,
                   "--batch-size", "16")
    assert cfg.optim.batch_size == 16 and cfg.sources["batch_size"] == "command line"
    assert cfg.optim.epochs == 9 and cfg.sources["epochs"] == f"config {sectioned}"  # the later file wins
    assert cfg.optim.lr == 1e-3 and cfg.optim.opt_betas == (0.9, 0.95) and cfg.sources["lr"] == f"config {flat}"
    assert cfg.aug.mixup == 0.2 and cfg.aug.scale == (0.5, 1.0)
    # a flag given on the command line with its default value still wins over a file
    cfg = _resolve("--data-path", shapes, "--device", "cpu", "--config", flat, "--batch-size", "128")
    assert cfg.optim.batch_size == 128


@pytest.mark.parametrize("text, words", [
    ("lrr: 0.1\n", ["unknown key 'lrr'", "did you mean 'lr'"]),
    ("optim:\n  batch_size: abc\n", ["batch_size", "'abc' is not an integer"]),
    ("batch_size: 0\n", ["batch_size", "positive integer"]),
    ("model_ema: 3\n", ["model_ema", "true or false"]),
    ("opt: adamx\n", ["opt", "'adamx'", "adamw, sgd"]),
    ("data:\n  lr: 0.1\n", ["lr belongs in the 'optim' section"]),
    ("- 1\n- 2\n", ["not a mapping"]),
    ("a: [\n", ["not valid YAML", "line 2"]),
    ("scale: [0.9, 0.1]\n", ["scale", "0 < MIN <= MAX <= 1"]),
    ("config: other.yaml\n", ["cannot be set inside a config file"]),
    ("epochs: 2.5\n", ["epochs", "not an integer"]),
])
def test_bad_config_file_is_one_line_and_creates_nothing(shapes, tmp_path, capsys, text, words):
    bad = _write(tmp_path / "bad.yaml", text)
    out = tmp_path / "run"
    assert main(["train", "--data-path", shapes, "--device", "cpu", "--output_dir", str(out), "--config", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err, err
    for w in words:
        assert w in err, err
    assert not out.exists()


def test_cross_flag_checks_happen_in_the_resolution(shapes):
    with pytest.raises(SpachError, match="even --batch-size"):
        _resolve("--data-path", shapes, "--device", "cpu", "--batch-size", "5", "--mixup", "0.8")
    with pytest.raises(SpachError, match="--npu conflicts with --device cpu"):
        _resolve("--device", "cpu", "--npu")
    with pytest.raises(SpachError, match="--norm-layer chooses a ShiftViT variant"):
        _resolve("--device", "cpu", "--norm-layer", "BN")
    with pytest.raises(SpachError, match="--teacher-path"):
        _resolve("--device", "cpu", "--distillation-type", "soft")
    with pytest.raises(SpachError, match="--data-pipeline fast reads ImageFolders only"):
        _resolve("--device", "cpu", "--data-path", shapes, "--data-set", "WDS", "--data-pipeline", "fast")


def test_help_groups_flags_by_section_and_eval_lists_only_what_it_reads(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = capsys.readouterr().out
    for title in ("data:", "model:", "optimisation and schedule:", "augmentation and regularisation:",
                  "distillation and fine-tuning:", "output and logging:", "device and precision:"):
        assert title in train_help
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    eval_help = capsys.readouterr().out
    for flag in ("--checkpoint", "--data-path", "--model", "--input-size", "--crop-pct", "--batch-size", "--amp",
                 "--dist-eval", "--ema", "--config"):
        assert flag in eval_help
    parser = build_parser("eval")
    options = {o for a in parser._subparsers._group_actions[0].choices["eval"]._actions for o in a.option_strings}
    for flag in ("--lr", "--mixup", "--epochs", "--model-ema", "--finetune", "--teacher-model", "--warmup-epochs",
                 "--output_dir", "--drop-path", "--eval"):
        assert flag not in options, flag


def test_benchmark_shares_train_flags():
    def actions(command):
        parser = build_parser(command)
        sub = parser._subparsers._group_actions[0].choices[command]
        return {a.dest: a for a in sub._actions}
    train, bench = actions("train"), actions("benchmark")
    for dest in ("batch_size", "device", "amp", "channels_last", "compile", "grad_checkpointing"):
        t, b = train[dest], bench[dest]
        assert (t.option_strings, t.default, t.type, t.choices) == (b.option_strings, b.default, b.type, b.choices)


def test_config_yaml_reruns_the_same_run(shapes, tmp_path, one_thread):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", *fast_flags(shapes, first, epochs=2)]) == 0
    text = (first / "config.yaml").read_text()
    assert text.startswith("# spach ") and "torch " in text.splitlines()[0]
    assert "# command: spach train --data-path" in text
    assert "  lr: " in text and "# effective_lr: " in text
    assert not list(first.glob(".config.yaml.*.tmp"))
    assert main(["train", "--config", str(first / "config.yaml"), "--output_dir", str(second)]) == 0
    a = torch.load(first / "checkpoint.pth", map_location="cpu", weights_only=False)
    b = torch.load(second / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    diff = {k for k in a["args"] if a["args"][k] != b["args"].get(k)}
    assert diff == {"output_dir", "config"}, diff


def test_explicit_resume_and_the_folders_own_checkpoint_are_never_silently_swapped(shapes, tmp_path, capsys,
                                                                                   one_thread):
    run, other = tmp_path / "run", tmp_path / "other"
    assert main(["train", *fast_flags(shapes, run, epochs=1)]) == 0
    assert main(["train", *fast_flags(shapes, other, epochs=1, lr=1e-3)]) == 0
    capsys.readouterr()
    own = run / "checkpoint.pth"
    before = own.read_bytes()
    # another checkpoint named while the folder holds its own: refused, naming both, nothing overwritten
    rc = main(["train", *fast_flags(shapes, run, "--resume", str(other / "checkpoint.pth"), epochs=2)])
    err = capsys.readouterr().err
    assert rc != 0 and str(other / "checkpoint.pth") in err and str(own) in err and "--no-auto-resume" in err
    assert own.read_bytes() == before
    # the folder's own checkpoint named explicitly is the same file: it continues
    assert main(["train", *fast_flags(shapes, run, "--resume", str(own), epochs=2)]) == 0
    assert "resumed" in capsys.readouterr().out


def test_ema_added_on_resume_starts_from_the_resumed_weights(shapes, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    assert main(["train", *fast_flags(shapes, run, epochs=1)]) == 0
    weights = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    flags = [f for f in fast_flags(shapes, run, epochs=2, lr=1e-9) if f != "--no-model-ema"]
    assert main(["train", *flags, "--model-ema", "--model-ema-decay", "0.999999"]) == 0
    ck = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=False)
    # with a near-zero lr and a decay near one, the EMA stays at the weights it started from
    worst = max((ck["model_ema"][k].float() - weights[k].float()).abs().max().item() for k in weights
                if weights[k].is_floating_point())
    assert worst < 1e-3, worst
    assert "holds no EMA weights: the EMA starts from its weights" in capsys.readouterr().out


def test_resume_refusal_names_the_identity_fields(shapes, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    assert main(["train", *fast_flags(shapes, run, epochs=1)]) == 0
    capsys.readouterr()
    flags = fast_flags(shapes, tmp_path / "new", "--resume", str(run / "checkpoint.pth"), epochs=2)
    flags[flags.index("--input-size") + 1] = "64"
    assert main(["train", *flags]) != 0
    err = capsys.readouterr().err
    assert "--input-size 32 in the checkpoint, 64 now" in err
    assert "keeps the classes and --model, --input-size, --stem-type" in err


def test_runconfig_is_what_the_runner_gets():
    assert "cfg" in {f.name for f in dataclasses.fields(__import__("spach.train.runner", fromlist=["Run"]).Run)}
    assert dataclasses.is_dataclass(RunConfig) and RunConfig.__dataclass_params__.frozen


def test_eval_reads_what_the_weights_record_and_refuses_other_classes(shapes, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    assert main(["train", *fast_flags(shapes, run, epochs=1)]) == 0
    folder = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run / "checkpoint.pth"), "--format", "hf", "--output", str(folder)]) == 0
    capsys.readouterr()
    # model, input size and crop come from the model folder, as from the checkpoint
    for weights in (run / "checkpoint.pth", folder):
        assert main(["eval", "--checkpoint", str(weights), "--data-path", shapes, "--device", "cpu",
                     "--num_workers", "0"]) == 0
        assert "Accuracy of the network on the 18 test images" in capsys.readouterr().out
    renamed = make_shapes_folder(tmp_path / "renamed", n_train=2, n_val=6, classes=("circle", "cross", "star"))
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pth"), "--data-path", renamed, "--device", "cpu",
                 "--num_workers", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other classes" in err and "only in the checkpoint: square" in err, err
    assert "only in the data: star" in err
