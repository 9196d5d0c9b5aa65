"""Classify image files: the top-k classes of each, with probabilities.

Images go through the model's evaluation transform at the checkpoint's input size (resize by crop_pct,
bicubic, center crop, ImageNet mean/std). Class names come from the checkpoint (`spach train` stores the
dataset's folder names in it; `spach export --format safetensors` and `--format hf` keep them); a 1000-class model without
names gets the ImageNet-1k class descriptions; otherwise classes are shown by index.

examples:
  spach predict --checkpoint output/best.pth photo1.jpg photo2.png
  spach predict --model spach_ms_s_patch4_224_conv --checkpoint spach_ms_conv_s.pth cat.jpg --topk 3 --json
"""
import json

import torch

from ..errors import DataError, SpachError
from ..inference import build_model, class_label, eval_transform
from ..models.fused import packed_weights
from ._help import use_help_formatter


def add_arguments(parser):
    use_help_formatter(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything Pillow reads)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="model name (`spach models`); may be left out when the checkpoint names it")
    parser.add_argument("--checkpoint", default=None, metavar="CKPT",
                        help="weights: a training checkpoint, an official release .pth, a .safetensors file, a model "
                             "folder (spach export --format hf), an hf-hub:ORG/NAME id, or an http(s) URL")
    parser.add_argument("--topk", type=int, default=5, help="how many classes to show per image")
    parser.add_argument("--img-size", type=int, default=None, metavar="N",
                        help="input size (default: the checkpoint's training size, else the model's 224)")
    parser.add_argument("--crop-pct", type=float, default=None,
                        help="resize to size / crop_pct before the centre crop (default: the checkpoint's "
                             "training --crop-pct, else the model's 0.875)")
    parser.add_argument("--use-ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", default=None,
                        help="cuda | npu | mps | cpu, optionally with an index (cuda:1); default: the best available")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")


def load_image(path: str, transform) -> torch.Tensor:
    """Read ``path`` as RGB (as training and eval read images) and transform it; any failure is a
    :class:`DataError` naming the file. Only regular files are opened: a FIFO named x.jpg would block forever."""
    from PIL import Image, UnidentifiedImageError
    from ..data.folder import load_rgb
    from ..files import NotARegularFile
    try:
        img = load_rgb(path)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except NotARegularFile as e:
        raise DataError(f"image {e}: pass image files") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image format Pillow knows") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to decode safely ({str(e).split(',')[0]}; Pillow refuses such "
                        f"files as possible decompression bombs): downscale it first") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt files, permissions
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    return transform(img)


def _device(name) -> torch.device:
    from ..runtime.device import resolve_device  # the one place that knows cuda / npu / mps / cpu
    kind = resolve_device(name)
    index = name.split(":", 1)[1] if name and ":" in name else None
    try:
        return torch.device(f"{kind}:{index}" if index else kind)
    except RuntimeError as e:
        raise SpachError(f"bad --device {name!r}: {e}") from None


def predict(model, info, paths, topk=5, batch_size=32, device="cpu"):
    """Top-``topk`` predictions for each path: a list of ``{'image', 'predictions': [{'rank',
    'class_index', 'class_name', 'probability'}]}``."""
    device = torch.device(device)
    transform = eval_transform(info)
    # read every image first, so a bad file fails before any work is done
    tensors = [load_image(p, transform) for p in paths]
    k = min(topk, info.num_classes)
    model = model.to(device)
    results = []
    with torch.no_grad(), packed_weights(model):
        for start in range(0, len(tensors), batch_size):
            batch = torch.stack(tensors[start:start + batch_size]).to(device)
            probs = model(batch).float().softmax(dim=-1).cpu()
            values, indices = probs.topk(k, dim=-1)
            for i, path in enumerate(paths[start:start + batch_size]):
                results.append({"image": path, "predictions": [
                    {"rank": r + 1, "class_index": int(idx), "class_name": class_label(info, int(idx)),
                     "probability": float(p)}
                    for r, (p, idx) in enumerate(zip(values[i].tolist(), indices[i].tolist()))]})
    return results


def run(args) -> int:
    if args.topk < 1:
        raise SpachError(f"--topk must be at least 1 (got {args.topk})")
    if args.batch_size < 1:
        raise SpachError(f"--batch-size must be at least 1 (got {args.batch_size})")
    device = _device(args.device)
    model, info = build_model(args.model, args.checkpoint, img_size=args.img_size, use_ema=args.use_ema,
                              crop_pct=args.crop_pct)
    results = predict(model, info, args.images, topk=args.topk, batch_size=args.batch_size, device=device)
    if args.json:
        print(json.dumps({"model": info.model_name, "checkpoint": info.checkpoint, "num_classes": info.num_classes,
                          "img_size": list(info.img_size), "results": results}, indent=2))
        return 0
    for res in results:
        print(res["image"])
        for p in res["predictions"]:
            name = f"  {p['class_name']}" if p["class_name"] is not None else ""
            print(f"  {p['rank']:>2}. {100 * p['probability']:6.2f}%  class {p['class_index']:<4}{name}")
    return 0
