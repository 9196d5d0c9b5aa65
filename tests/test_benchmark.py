"""`spach benchmark` and the fast data pipeline: runs, counts what it times, reports, refuses bad flags; the fast
pipeline produces what the timm transform produces (shape, dtype, normalisation, statistics)."""
import json
import os
import random
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

import spach
from spach.cli import main as cli_main
from train_helpers import photo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "spach_ms_xxs_patch4_224_conv"
# tiny steps: one thread is faster than two (no fork/join per op) and the suite runs beside other jobs
SMALL = ["--img-size", "64", "--num-classes", "10", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _photo(w, h, seed=0):
    return photo(w, h, seed)


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    for c in range(2):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(4):
            _photo(160, 120, seed=10 * c + i).save(d / f"{i}.jpg", quality=90)
    return root


def _run_json(tmp_path, *flags):
    out = tmp_path / "bench.json"
    rc = cli_main(["benchmark", "--model", MODEL, "--device", "cpu", "--json", str(out), *SMALL, *flags])
    assert rc == 0
    return json.loads(out.read_text())["results"]


def test_benchmark_train_and_infer_report_fields(tmp_path, capsys):
    results = _run_json(tmp_path, "--mode", "both", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                        "--repeats", "2", "--amp", "off")
    table = capsys.readouterr().out
    assert "img/s" in table and "TFLOP/s" in table and MODEL in table
    assert [r["mode"] for r in results] == ["train", "infer"]
    macs = spach.models.count_flops(spach.create_model(MODEL, num_classes=10, img_size=64), (64, 64))
    for r in results:
        assert r["img_per_s"] > 0 and r["step_ms"] > 0
        assert r["images_per_block"] == 2 * 2          # steps * batch, warm-up not included
        assert r["images_counted"] == 2 * 2 * 2        # ... per timed block, two blocks
        assert len(r["block_seconds"]) == 2
        assert r["peak_mem_mb"] > 0 and r["mem_kind"] == "peak_rss"
        factor = 3 if r["mode"] == "train" else 1
        assert r["gflops_per_img"] == pytest.approx(2 * factor * macs / 1e9)
        assert r["tflops"] == pytest.approx(r["img_per_s"] * r["gflops_per_img"] / 1e3)
        assert r["mfu_pct"] is None                    # no GPU peak on a CPU
    assert results[0]["optimizer"] == "fused"          # fused AdamW is the default where the device has it


def test_warmup_steps_are_run_but_not_counted():
    from spach.bench.runner import BenchConfig, run_benchmark
    calls = []

    def count(module, args, output):
        if isinstance(module, spach.SpachMS):
            calls.append(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        r = run_benchmark(BenchConfig(model=MODEL, batch_size=2, steps=2, warmup=2, repeats=2, img_size=64,
                                      num_classes=10, amp="off"))
    finally:
        handle.remove()
    assert len(calls) == 2 + 2 * 2                     # every step ran a forward, warm-up included
    assert r["images_counted"] == 2 * 2 * 2            # only the timed steps are counted
    assert r["img_per_s"] == pytest.approx(statistics.median(2 * 2 / t for t in r["block_seconds"]), rel=1e-2)


def test_fp32_step_is_plain_math_and_bf16_runs(tmp_path):
    (fp32,) = _run_json(tmp_path, "--batch-size", "2", "--steps", "1", "--warmup", "0", "--repeats", "1",
                        "--amp", "off", "--no-fused-optimizer", "--no-mixup")
    assert fp32["amp"] == "off" and fp32["optimizer"] == "foreach" and fp32["mixup"] is False
    (bf16,) = _run_json(tmp_path, "--batch-size", "2", "--steps", "1", "--warmup", "0", "--repeats", "1",
                        "--amp", "bf16", "--grad-checkpointing", "--channels-last")
    assert bf16["amp"] == "bf16" and bf16["grad_checkpointing"] and bf16["channels_last"]


@pytest.mark.parametrize("pipeline", ["fast", "timm"])
def test_benchmark_from_jpeg_folder(tmp_path, jpeg_dir, pipeline):
    (r,) = _run_json(tmp_path, "--data", str(jpeg_dir), "--data-pipeline", pipeline, "--workers", "0",
                     "--batch-size", "2", "--steps", "2", "--warmup", "1", "--repeats", "1", "--amp", "off")
    assert r["data"] == str(jpeg_dir) and r["data_pipeline"] == pipeline
    assert r["images_counted"] == 4 and r["img_per_s"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--model", "spach_nope"], "unknown model"),
    (["--model", MODEL, "--steps", "0"], "--steps"),
    (["--model", MODEL, "--batch-size", "0"], "--batch-size"),
    (["--model", MODEL, "--amp", "fp16", "--device", "cpu"], "fp16"),
    (["--model", MODEL, "--data", "/no/such/folder"], "--data"),
    (["--model", MODEL, "--device", "tpu"], "--device"),
])
def test_bad_flags_give_one_line_errors(flags, message, capsys):
    try:
        rc = cli_main(["benchmark", *flags, "--steps" if "--steps" not in flags else "--warmup", "1"])
    except SystemExit as e:  # refused by the flag's own parser (shared with `spach train`)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_mode_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["benchmark", "--model", MODEL, "--mode", "fast"])
    assert e.value.code == 2


def test_gpu_script_commands_parse(tmp_path):
    """Every `spach benchmark` call in benchmarks/gpu.sh names known models and flags (the script runs on a lent
    GPU with a fixed time budget, so a typo must fail here, not there)."""
    import re
    import shlex
    from spach.cli import build_parser
    from spach.commands.benchmark import configs_from_args
    text = open(os.path.join(ROOT, "benchmarks", "gpu.sh")).read().replace("\\\n", " ")
    values = dict(re.findall(r"^(MODEL|B)=(\S+)$", text, flags=re.M))
    values.update(OUT=str(tmp_path), DATA=str(tmp_path), WORKERS="2")
    calls = [line.split(None, 3)[3] for line in text.splitlines() if line.startswith("step ")]
    assert len(calls) == 9
    for call in calls:
        call = re.sub(r"\$(\w+)|\"\$(\w+)\"", lambda m: values[m.group(1) or m.group(2)], call)
        argv = ["benchmark", "--device", "cuda", "--batch-size", values["B"], *shlex.split(call)]
        args = build_parser().parse_args(argv)
        cfgs = configs_from_args(args)
        assert cfgs and all(c.device == "cuda" and c.batch_size == 128 for c in cfgs)


# --- the fast data pipeline ---------------------------------------------------------------------------------

def test_fast_transform_output_shape_dtype_and_normalisation(tmp_path):
    from spach.data.fast_pipeline import DeviceNormalize, build_fast_train_transform
    path = tmp_path / "a.jpg"
    _photo(500, 375).save(path, quality=90)
    tf = build_fast_train_transform(224)
    x = tf(str(path))
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8
    batch = torch.stack([tf(str(path)) for _ in range(4)])
    y = DeviceNormalize(re_prob=0.0)(batch)
    assert y.dtype == torch.float32 and y.shape == (4, 3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(y, (batch.float() / 255 - mean) / std, atol=1e-5)
    with pytest.raises(TypeError):
        DeviceNormalize()(y)


def test_fast_crop_resize_matches_pil_bicubic(tmp_path):
    """No augmentation and a whole-image crop: the uint8 resize equals PIL's bicubic resize to within a grey
    level, including a DCT-scaled (draft) decode of a large JPEG."""
    from spach.data.fast_pipeline import FastTrainTransform
    for (w, h) in [(500, 375), (1600, 1200)]:
        img = _photo(w, h)
        path = tmp_path / f"{w}.jpg"
        img.save(path, quality=95)
        tf = FastTrainTransform(224, scale=(1.0, 1.0), ratio=(w / h, w / h), hflip=0.0, auto_augment=None)
        fast = tf(str(path)).permute(1, 2, 0).numpy().astype(np.float64)
        ref = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)).astype(np.float64)
        diff = np.abs(fast - ref)
        # 500x375 decodes at full size (exact filter); 1600x1200 decodes at 1/4 scale in the DCT domain
        assert diff.mean() < (0.6 if w == 500 else 3.0), (w, diff.mean())


def test_fast_pipeline_statistics_match_timm_transform(tmp_path):
    """Same augmentation distribution: over many draws on one image, per-channel mean and spread of the
    normalised outputs agree with timm's DeiT transform."""
    from timm.data import create_transform
    from spach.data.fast_pipeline import DeviceNormalize, build_fast_train_transform
    from spach.data.transforms import patch_posterize
    path = tmp_path / "b.jpg"
    _photo(500, 375, seed=3).save(path, quality=90)
    timm_tf = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                               re_prob=0.25, re_mode="pixel", re_count=1)
    patch_posterize(timm_tf)
    fast_tf, finalize = build_fast_train_transform(224), DeviceNormalize()
    n = 200  # the per-image spread is heavy-tailed (a posterised-to-black draw moves it): 100 draws are too few
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ref = torch.stack([timm_tf(Image.open(path).convert("RGB")) for _ in range(n)])
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    fast = finalize(torch.stack([fast_tf(str(path)) for _ in range(n)]))
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    m_ref, m_fast = ref.mean(dim=(0, 2, 3)), fast.mean(dim=(0, 2, 3))
    s_ref, s_fast = ref.std(dim=(0, 2, 3)), fast.std(dim=(0, 2, 3))
    assert torch.allclose(m_ref, m_fast, atol=0.08), (m_ref, m_fast)
    assert torch.allclose(s_ref, s_fast, rtol=0.08), (s_ref, s_fast)
    # the per-image means spread alike (the random crops and RandAugment are drawn from the same distribution)
    spread_ref, spread_fast = ref.mean(dim=(1, 2, 3)).std(), fast.mean(dim=(1, 2, 3)).std()
    assert spread_fast == pytest.approx(spread_ref.item(), rel=0.3)


def test_nvjpeg_path_pieces_run_on_the_cpu(jpeg_dir):
    """The GPU loader (file bytes + header crop boxes in the workers, batched decode_jpeg + crop/resize/flip on the
    device) run end to end with device='cpu': same shapes as the CPU fast path, and a given box gives PIL's crop and
    bicubic resize (which the CPU fast path matches) to within JPEG-decoder and rounding differences."""
    from spach.bench.loaders import GpuJpegDecoder, JpegBytesDataset, NvjpegLoader, collate_jpeg_bytes
    from spach.data.folder import scan_images
    samples, _ = scan_images(str(jpeg_dir))
    ds = JpegBytesDataset(samples, (64, 64), (0.08, 1.0), (3 / 4, 4 / 3), 0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_jpeg_bytes)
    batches = list(NvjpegLoader(loader, GpuJpegDecoder(64, "cpu"), torch.device("cpu")))
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.uint8 and y.tolist() == [0, 0, 0, 0]
    data, box, _ = ds[0]
    i, j, h, w, _flip = box.tolist()
    box[4] = 0
    gpu = GpuJpegDecoder(64, "cpu")([data], box[None])[0].float()
    # PIL's crop + bicubic resize of that box (the reference the CPU fast path matches to within 1 grey level)
    ref = Image.open(samples[0][0]).convert("RGB").crop((j, i, j + w, i + h)).resize((64, 64), Image.BICUBIC)
    cpu = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()
    assert (gpu - cpu).abs().mean() < 1.0, (gpu - cpu).abs().mean()


def test_nvjpeg_path_refuses_non_jpeg_files(tmp_path):
    from spach.bench.loaders import build_benchmark_loader
    from spach.errors import DataError
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    _photo(64, 48).save(d / "x.jpg", quality=90)
    _photo(64, 48).save(d / "y.png")
    with pytest.raises(DataError, match="JPEG files only.*y.png"):  # refused before any CUDA call
        build_benchmark_loader(str(tmp_path), 2, 64, "nvjpeg", 0, torch.device("cuda"), train=True)
    (tmp_path / "train" / "a" / "y.png").unlink()
    for device, train in (("cpu", True), ("cuda", False)):  # GPU decoding in training only
        with pytest.raises(DataError, match="nvjpeg decodes on a CUDA GPU"):
            build_benchmark_loader(str(tmp_path), 2, 64, "nvjpeg", 0, torch.device(device), train=train)


def test_sample_crop_follows_timm_distribution():
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from spach.data.fast_pipeline import sample_crop
    img = Image.new("RGB", (500, 375))
    random.seed(5)
    ours = [sample_crop(500, 375) for _ in range(300)]
    random.seed(5)
    theirs = [RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(300)]
    assert ours == theirs  # same algorithm, same random draws


def test_cpu_tuning_is_reported():
    from spach.runtime.cpu_tuning import apply_cpu_tuning, cpu_has_native_bf16, default_cpu_amp
    threads = torch.get_num_threads()
    try:
        report = apply_cpu_tuning(threads=1)
        assert torch.get_num_threads() == 1
        assert report["threads"] == 1 and "allocator" in report
    finally:
        torch.set_num_threads(threads)
    assert default_cpu_amp() == ("bf16" if cpu_has_native_bf16() else "off")


def test_fast_image_folder_skips_unreadable_files(tmp_path):
    from spach.data.fast_pipeline import FastImageFolder, build_fast_train_transform
    good = tmp_path / "good.jpg"
    _photo(200, 150).save(good, quality=90)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = FastImageFolder([(str(bad), 1), (str(good), 0)], ["a", "b"], build_fast_train_transform(64))
    x, target, n_bad = ds[0]                       # the unreadable file is replaced by the next one
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8 and target == 0 and n_bad == 1


def test_fast_pipeline_refuses_recipes_it_does_not_implement():
    from spach.data.fast_pipeline import build_fast_train_transform
    with pytest.raises(ValueError, match="timm pipeline"):
        build_fast_train_transform(224, auto_augment=None, color_jitter=0.4)
    with pytest.raises(ValueError, match="timm pipeline"):
        build_fast_train_transform(32)
    assert build_fast_train_transform(224, color_jitter=0.4).rand_augment is not None  # ignored with RandAugment


def test_fast_train_dataset_and_finalize_from_trainer_flags(tmp_path):
    from spach.data.fast_pipeline import build_fast_train_dataset
    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.jpg"
        _photo(180, 140, seed=i).save(p, quality=90)
        paths.append((str(p), i))
    dataset, finalize = build_fast_train_dataset(paths, ["a", "b"], 64, reprob=0.0, scale=[0.5, 1.0])
    batch = torch.stack([dataset[i][0] for i in range(2)])
    out = finalize(batch)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    assert -2.2 < out.min() and out.max() < 2.7           # ImageNet-normalised range of uint8 input


def test_cpu_train_script_plain_path_is_the_original_op_sequence(tmp_path):
    """benchmarks/cpu_train.py: the plain path takes the explicit softmax attention (the original code's ops), a
    second plain path with SDPA runs only for models with attention, and every ratio is against plain."""
    import importlib.util
    import subprocess
    import sys
    path = os.path.join(ROOT, "benchmarks", "cpu_train.py")
    spec = importlib.util.spec_from_file_location("cpu_train_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for model, attention in [("spach_ms_xxs_patch4_224_attn", True), ("spach_ms_s_patch4_224_hybrid", True),
                             ("spach_ms_xxs_patch4_224_conv", False), ("spach_xxs_patch16_224_mlp", False)]:
        assert script.has_attention(model) is attention

    out = tmp_path / "cpu_train.json"
    proc = subprocess.run([sys.executable, path, "--models", "spach_ms_xxs_patch4_224_attn", "--batch-size", "2",
                           "--rounds", "1", "--blocks", "1", "--steps", "1", "--warmup", "0", "--threads", "1",
                           "--no-memory", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["models"]["spach_ms_xxs_patch4_224_attn"]["configs"]
    assert list(rows) == ["plain", "plain-sdpa", "fp32-opt", "bf16"]
    assert "--no-fused-attn" in rows["plain"]["command"] and "--no-fused-attn" not in rows["plain-sdpa"]["command"]
    assert "--no-fused-attn" not in rows["fp32-opt"]["command"]
    assert rows["plain"]["speedup_cpu"] == 1.0
    for row in rows.values():
        assert row["img_per_cpu_s"] > 0
        assert row["speedup_cpu_vs_sdpa"] == pytest.approx(row["img_per_cpu_s"] / rows["plain-sdpa"]["img_per_cpu_s"])
    assert "x plain-sdpa" in proc.stdout


def test_gemm_rates_script_reports_every_shape():
    """benchmarks/gemm_rates.py runs and prints an fp32 and a bf16 rate for each product plus the median ratio."""
    import subprocess
    import sys
    path = os.path.join(ROOT, "benchmarks", "gemm_rates.py")
    proc = subprocess.run([sys.executable, path, "--batch", "1", "--repeats", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.rstrip().endswith("x") and not line.startswith("median")]
    assert len(rows) == 8
    for line in rows:
        fp32, bf16, ratio = line.split()[-3:]
        assert float(fp32) > 0 and float(bf16) > 0 and float(ratio[:-1]) > 0
    assert "median bf16/fp32:" in proc.stdout


def test_mlp_paths_script_reports_every_form_and_product():
    """benchmarks/mlp_paths.py runs the fused MLP's inference forms per stage and the products' rates."""
    import subprocess
    import sys
    from spach.models import fused
    if not fused._onednn_linear_available():
        pytest.skip("this torch has no oneDNN linear")
    path = os.path.join(ROOT, "benchmarks", "mlp_paths.py")
    proc = subprocess.run([sys.executable, path, "--batch", "1", "--repeats", "1", "--threads", "1", "--square", "256"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    stage_rows = [line for line in out.splitlines() if "x2)" in line or "x6)" in line]
    assert len(stage_rows) == 4 and all(len(line.split()) == 7 for line in stage_rows)
    assert "packed / reorder:" in out and "sum in epilogue / own pass:" in out
    products = [line for line in out.splitlines() if line.startswith("fc1 ")]
    assert len(products) == 4 and all(line.count("GF/s") == 2 for line in products)
    assert "256 x 256 x 256" in out


def test_benchmark_times_the_training_step_of_spach_train(monkeypatch):
    """The benchmark's step is train_step with training's optimizer (same kernels, same weight-decay groups) and
    loss, so its figures are those of `spach train`."""
    import spach.bench.runner as bench_runner
    from spach.train.engine import train_step
    from spach.train.optim import build_optimizer, optimizer_kind
    wl = bench_runner.Workload(bench_runner.BenchConfig(model=MODEL, batch_size=2, img_size=64, num_classes=10,
                                                        amp="off"))
    step = wl.step_pieces
    trained = build_optimizer(wl.model, torch.device("cpu"), lr=1e-3, weight_decay=0.05)
    assert optimizer_kind(step.optimizer) == optimizer_kind(trained) == wl.optimizer_kind
    assert [len(g["params"]) for g in step.optimizer.param_groups] == [len(g["params"]) for g in trained.param_groups]
    assert [g["weight_decay"] for g in step.optimizer.param_groups] == [0.0, 0.05]
    assert type(step.criterion.base_criterion).__name__ == "SoftTargetCrossEntropy"  # mixup on: soft targets
    before = [p.detach().clone() for p in wl.model.parameters()]
    calls = []
    monkeypatch.setattr(bench_runner, "train_step", lambda *a, **kw: calls.append(a[0]) or train_step(*a, **kw))
    loss = wl.step()
    assert calls == [step] and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, wl.model.parameters()))  # the optimizer stepped
