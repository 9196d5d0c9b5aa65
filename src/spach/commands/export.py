"""Export a SPACH model to ONNX, safetensors, TorchScript or a Hugging Face model folder, and check what it wrote.

ONNX files have a dynamic batch axis and are run with onnxruntime on a random batch against the PyTorch
model (the max abs difference is printed; above --tolerance the export fails). safetensors files carry
the model's config as metadata (model name, num_classes, img_size, class names, mean/std, spach version),
so spach.create_model(NAME, checkpoint_path=FILE) and `spach predict --checkpoint FILE` load them back.
TorchScript files come from torch.jit.script (torch.jit.trace if scripting fails) and are checked the
same way as ONNX. --format hf writes a folder in timm's Hugging Face layout (config.json, model.safetensors, a
README.md model card): timm.create_model("local-dir:FOLDER", pretrained=True) (after import spach), `spach push`
and every --checkpoint take it; the check rebuilds it both ways and compares the logits.

examples:
  spach export --model spach_ms_s_patch4_224_conv --checkpoint spach_ms_conv_s.pth --format onnx
  spach export --checkpoint output/checkpoint.pth --format safetensors --output model.safetensors
  spach export --checkpoint output/best.pth --format hf --output my-model
"""
import contextlib
import json
import logging
import os
import re
import shutil
import warnings

import torch

from ..errors import SpachError
from ..files import space_problem, write_failure_reason
from ..inference import ModelInfo, build_model
from ..weights import HF_CONFIG, HF_WEIGHTS, is_hf_hub, is_url, local_weights, open_weights, url_file_name
from ._help import use_help_formatter

# format -> the output's extension (hf: a folder, named with this suffix by default)
FORMATS = {"onnx": ".onnx", "safetensors": ".safetensors", "torchscript": ".pt", "hf": "-hf"}
MIN_DYNAMO_OPSET = 18
# the example batch the exporters see, and another for the check (a dynamic batch axis must take it);
# torch.export specialises a dimension of size 1, so the example is 2
EXPORT_BATCH, CHECK_BATCH = 2, 3
ONNX_INSTALL = "spach export --format onnx needs onnx, onnxruntime and onnxscript: pip install 'spach[export]'"


def add_arguments(parser):
    use_help_formatter(parser)
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="model name (`spach models`); may be left out when the checkpoint names it")
    parser.add_argument("--checkpoint", default=None, metavar="CKPT",
                        help="weights: a training checkpoint, an official release .pth, a .safetensors file, a model "
                             "folder, an hf-hub:ORG/NAME id, or an http(s) URL (left out: random weights, with a "
                             "warning)")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="what to write")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="output file, or folder for --format hf (default: the checkpoint's name, or the "
                             "model's, with the format's extension (hf: '-hf'), next to the checkpoint)")
    parser.add_argument("--opset", type=int, default=None, metavar="N",
                        help="ONNX opset version (default: the torch exporter's own; below 18 uses torch's "
                             "TorchScript-based exporter)")
    parser.add_argument("--img-size", type=int, default=None, metavar="N",
                        help="input size (default: the checkpoint's training size, else the model's 224)")
    parser.add_argument("--use-ema", action="store_true", help="export the checkpoint's EMA weights")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest max abs difference of the logits accepted when checking an ONNX or "
                             "TorchScript file")


def default_output(args, info: ModelInfo) -> str:
    ext = FORMATS[args.format]
    if args.checkpoint:
        if is_hf_hub(args.checkpoint):  # in the current folder, named after the repo
            return args.checkpoint.split("/")[-1].split("@")[0] + ext
        if is_url(args.checkpoint) and not args.checkpoint.lower().startswith("file:"):
            # in the current folder, named after the downloaded file
            return os.path.splitext(url_file_name(args.checkpoint))[0] + ext
        if os.path.isdir(args.checkpoint):  # beside a model folder, named after it
            return os.path.normpath(args.checkpoint) + ext
        stem = os.path.splitext(local_weights(args.checkpoint))[0]
        return stem + ext
    return info.model_name + ext


def run(args) -> int:
    if args.opset is not None and args.format != "onnx":
        raise SpachError(f"--opset applies to --format onnx only (got --format {args.format})")
    if not args.tolerance >= 0:
        raise SpachError(f"--tolerance must be >= 0 (got {args.tolerance})")
    if args.format == "onnx":
        _require_onnx(args.opset)
    # opened once: the model is built from it, and an hf folder's card reads its training run
    weights = open_weights(args.checkpoint) if args.checkpoint else None
    checkpoint = weights.path if weights else None
    model, info = build_model(args.model, weights, img_size=args.img_size, use_ema=args.use_ema)
    output = args.output or default_output(args, info)
    _check_output(output, args, info, checkpoint)
    parent = os.path.dirname(os.path.abspath(output))
    exporter = {"onnx": export_onnx, "safetensors": export_safetensors, "torchscript": export_torchscript,
                "hf": export_hf}
    # write and check a temporary file (folder) beside the output, then rename: a failed check or an interrupted
    # export never leaves a broken file under the output's name (nor removes an older one)
    # (named with the format's extension: the safetensors check reloads it by name, whatever --output is called)
    partial = os.path.join(parent, f".{os.path.basename(output)}.partial{FORMATS[args.format]}")
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 5 // 4 + 2 ** 20
    problem = space_problem(parent, need)
    if problem:
        raise SpachError(f"cannot write {output}: {parent} {problem}; free space or pass an --output elsewhere")
    try:
        if args.format == "hf":
            exporter[args.format](model, info, partial, args, weights)
            _replace_folder(partial, output)
        else:
            exporter[args.format](model, info, partial, args)
            os.replace(partial, output)
    except Exception as e:
        reason = write_failure_reason(e)
        if not reason:
            raise
        raise SpachError(f"cannot write {output}: {parent} {reason}; nothing was written under that name (an older "
                         f"file is kept): free space or pass an --output elsewhere") from None
    finally:
        if os.path.isdir(partial):
            shutil.rmtree(partial)
        elif os.path.exists(partial):
            os.remove(partial)
    files = [os.path.join(output, f) for f in os.listdir(output)] if os.path.isdir(output) else [output]
    size_mb = sum(os.path.getsize(f) for f in files) / 2 ** 20
    print(f"wrote {output} ({size_mb:.1f} MB): {info.model_name}, {info.num_classes} classes, "
          f"input {info.img_size[0]}x{info.img_size[1]}")
    return 0


def _check_output(output: str, args, info: ModelInfo, checkpoint: str) -> None:
    """Refuse an --output that cannot be written, or that would overwrite the checkpoint or a folder that is not
    an earlier export."""
    from ..files import folder_write_problem, path_kind
    kind = path_kind(output)
    if args.format == "hf":
        if kind == "folder" and os.listdir(output) and not os.path.isfile(os.path.join(output, HF_CONFIG)):
            raise SpachError(f"--output {output} is a folder holding other files: pass a new folder (an earlier "
                             f"--format hf export is replaced)")
        if kind not in ("missing", "folder"):
            raise SpachError(f"--output {output} is a {kind}: --format hf writes a folder; pass a new folder path")
        if checkpoint and os.path.abspath(os.path.dirname(checkpoint)) == os.path.abspath(output):
            raise SpachError(f"--output {output} holds the checkpoint itself: pass another --output FOLDER")
    else:
        if kind == "folder":
            name = os.path.basename(default_output(args, info))
            raise SpachError(f"--output {output} is a folder: pass a file path, e.g. --output "
                             f"{os.path.join(output, name)}")
        if kind not in ("missing", "regular file"):
            raise SpachError(f"--output {output} is a {kind}: pass the path of a file to write")
        if checkpoint and os.path.exists(output) and os.path.samefile(output, checkpoint):
            raise SpachError(f"--output {output} is the checkpoint itself: pass another --output FILE")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise SpachError(f"cannot write {output}: folder {parent} does not exist")
    problem = folder_write_problem(parent)
    if problem:  # before the model is built and traced, and never mistaken for an exporter's failure
        raise SpachError(f"cannot write {output}: folder {parent} {problem}; pass an --output in a writable folder")


def _replace_folder(partial: str, output: str) -> None:
    """Put the checked folder ``partial`` at ``output``; an earlier export there is removed only once the new one
    is in place."""
    if not os.path.exists(output):
        os.replace(partial, output)
        return
    old = partial + ".old"
    os.replace(output, old)
    os.replace(partial, output)
    shutil.rmtree(old)


def _example(info: ModelInfo, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *info.img_size, generator=g)


def _compare(name: str, got, expected: torch.Tensor, tolerance: float) -> float:
    got = torch.as_tensor(got)
    if tuple(got.shape) != tuple(expected.shape):
        raise SpachError(f"{name} check failed: output shape {tuple(got.shape)}, PyTorch gives "
                         f"{tuple(expected.shape)}")
    diff = (got.float() - expected.float()).abs().max().item()
    print(f"{name} check: batch {expected.shape[0]}, max abs diff vs PyTorch {diff:.3g} (tolerance {tolerance:g})")
    if not diff <= tolerance:  # also catches NaN
        raise SpachError(f"{name} check failed: max abs diff {diff:.3g} above --tolerance {tolerance:g}; "
                         f"the exported file does not reproduce the model")
    return diff


# --- ONNX ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_torch_logs():
    # torch.export logs pages of guard diagnostics before raising; the error we raise says what failed
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _require_onnx(opset=None):
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        if opset is None or opset >= MIN_DYNAMO_OPSET:
            import onnxscript  # noqa: F401  (what the torch.export-based exporter writes ONNX with)
    except ImportError as e:
        raise SpachError(f"{ONNX_INSTALL} (missing: {e.name or e})") from None


def export_onnx(model, info: ModelInfo, output: str, args) -> float:
    import onnx
    import onnxruntime as ort

    x = _example(info, EXPORT_BATCH, seed=0)
    # The torch.export-based exporter writes opset 18 and newer; older opsets (for older runtimes) come
    # from the TorchScript-based exporter, which torch still ships.
    legacy = args.opset is not None and args.opset < MIN_DYNAMO_OPSET
    try:
        with warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            if legacy:
                print(f"note: opset {args.opset} < {MIN_DYNAMO_OPSET}: using torch's TorchScript-based ONNX exporter")
                torch.onnx.export(model, (x,), output, dynamo=False, input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                                  opset_version=args.opset, do_constant_folding=True)
            else:
                batch = torch.export.Dim("batch", min=1, max=4096)
                program = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"],
                                            output_names=["logits"], dynamic_shapes={"x": {0: batch}},
                                            opset_version=args.opset, optimize=True, verbose=False)
                program.save(output, external_data=False)
    except ImportError as e:  # onnxscript is what the torch.export-based exporter runs on
        raise SpachError(f"{ONNX_INSTALL} ({e})") from None
    except Exception as e:
        if write_failure_reason(e):  # the disk, not the exporter: said once, by the caller
            raise
        detail = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
        hint = (f"; try another --opset than {args.opset}" if legacy else
                f"; --opset {MIN_DYNAMO_OPSET - 1} uses torch's TorchScript-based exporter instead")
        raise SpachError(f"torch.onnx.export of {info.model_name} failed ({type(e).__name__}: "
                         f"{detail[0][:300] if detail else 'no detail'}){hint}") from None

    # model facts as ONNX metadata, so a consumer knows the preprocessing and the classes
    proto = onnx.load(output)
    for key, value in info.metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"spach.{key}", json.dumps(value)
    onnx.save(proto, output)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    print(f"exported ONNX (opset {opset}, dynamic batch axis)")

    session = ort.InferenceSession(output, providers=["CPUExecutionProvider"])
    check = _example(info, CHECK_BATCH, seed=1)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        expected = model(check)
    got = session.run(None, {session.get_inputs()[0].name: check.numpy()})[0]
    return _compare("onnxruntime", got, expected, args.tolerance)


# --- safetensors --------------------------------------------------------------------------------------
def write_safetensors(model, info: ModelInfo, output: str) -> None:
    """The model's state_dict, with its facts (:meth:`ModelInfo.metadata`) as JSON string metadata."""
    from safetensors.torch import save_file
    state_dict = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": "pt"}
    metadata.update({k: json.dumps(v) for k, v in info.metadata().items()})
    save_file(state_dict, output, metadata=metadata)


def export_safetensors(model, info: ModelInfo, output: str, args) -> None:
    write_safetensors(model, info, output)

    # round trip: the file alone (and its metadata) must rebuild the same model
    from ..models import create_model
    kwargs = {}
    if info.num_classes != 1000:
        kwargs["num_classes"] = info.num_classes
    if tuple(info.img_size) != (224, 224):
        kwargs["img_size"] = info.img_size[0] if info.img_size[0] == info.img_size[1] else info.img_size
    reloaded = create_model(info.model_name, checkpoint_path=output, **kwargs).eval()
    x = _example(info, EXPORT_BATCH, seed=1)
    with torch.no_grad():
        same = torch.equal(reloaded(x), model(x))
    if not same:
        raise SpachError("safetensors check failed: the written file does not reproduce the model's logits")
    name = args.output or default_output(args, info)
    call = ", ".join([repr(info.model_name), f"checkpoint_path={name!r}"] + [f"{k}={v!r}" for k, v in kwargs.items()])
    print(f"safetensors check: spach.create_model({call}) gives identical logits")


# --- TorchScript --------------------------------------------------------------------------------------
def export_torchscript(model, info: ModelInfo, output: str, args) -> float:
    x = _example(info, EXPORT_BATCH, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        try:
            scripted = torch.jit.script(model)
            how = "torch.jit.script"
        except Exception as e:
            print(f"note: torch.jit.script failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                  f"tracing with torch.jit.trace instead (control flow is fixed to this input shape)")
            try:
                scripted = torch.jit.trace(model, (x,), check_trace=False)
            except Exception as e2:
                raise SpachError(f"TorchScript export of {info.model_name} failed: torch.jit.trace: "
                                 f"{type(e2).__name__}: {str(e2).splitlines()[0][:200]}") from None
            how = "torch.jit.trace"
        extra = {"spach.json": json.dumps(info.metadata())}
        torch.jit.save(scripted, output, _extra_files=extra)
        print(f"exported TorchScript ({how})")
        loaded = torch.jit.load(output, map_location="cpu")
    check = _example(info, CHECK_BATCH, seed=1)
    with torch.no_grad():
        expected = model(check)
        got = loaded(check)
    return _compare("TorchScript", got, expected, args.tolerance)


# --- Hugging Face / timm model folder -----------------------------------------------------------------------
def export_hf(model, info: ModelInfo, output: str, args, weights=None) -> None:
    """``output``/config.json (timm's layout), model.safetensors (with the same metadata as --format safetensors)
    and README.md (the model card); then the folder must rebuild the model's exact logits through
    ``spach.create_model`` and through timm's own ``local-dir:`` loading."""
    from ..models import count_flops
    from .hf_folder import hf_config, model_card
    os.makedirs(output)
    write_safetensors(model, info, os.path.join(output, HF_WEIGHTS[0]))
    with open(os.path.join(output, HF_CONFIG), "w") as f:
        json.dump(hf_config(model, info), f, indent=2)
        f.write("\n")
    try:
        flops = count_flops(model, info.img_size)
    except Exception:  # a count is a card's detail; the export does not depend on it
        flops = None
    with open(os.path.join(output, "README.md"), "w") as f:
        f.write(model_card(model, info, weights, flops))

    import timm
    from ..models import create_model
    x = _example(info, EXPORT_BATCH, seed=1)
    with torch.no_grad():
        expected = model(x)
        same_spach = torch.equal(create_model("local-dir:" + output).eval()(x), expected)
        same_timm = torch.equal(timm.create_model("local-dir:" + output, pretrained=True).eval()(x), expected)
    if not (same_spach and same_timm):
        which = "spach.create_model" if not same_spach else "timm.create_model"
        raise SpachError(f"hf folder check failed: {which} on the written folder does not reproduce the model's "
                         f"logits")
    print("hf folder check: spach.create_model('local-dir:FOLDER') and timm.create_model('local-dir:FOLDER', "
          "pretrained=True) give identical logits")
