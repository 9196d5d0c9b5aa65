"""List the models (SPACH, sMLPNet): parameters, GFLOPs (multiply-accumulates at the default input) and the published
ImageNet-1k top-1 where the paper reports one."""
import json
import sys


def add_arguments(parser):
    parser.add_argument("--filter", default="", help="only names containing this substring")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def model_table(name_filter: str = ""):
    """One row per model: name, params, MACs, published top-1 (None where unpublished)."""
    import torch

    from ..models import MODEL_CONFIGS, count_flops, count_params, create_model

    rows = []
    for name, meta in MODEL_CONFIGS.items():
        if name_filter and name_filter not in name:
            continue
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = create_model(name)
        rows.append(dict(name=name, params=count_params(model), flops=count_flops(model),
                         top1=meta.get("top1"), paper_name=meta.get("paper_name"), weights=meta.get("weights"),
                         drop_path_rate=meta.get("drop_path_rate")))
    return rows


def format_table(rows) -> str:
    lines = [f"{'model':36s} {'params (M)':>10s} {'GFLOPs':>7s} {'top-1':>6s}  paper name"]
    for r in rows:
        top1 = f"{r['top1']:.1f}" if r["top1"] is not None else "-"
        lines.append(f"{r['name']:36s} {r['params'] / 1e6:10.2f} {r['flops'] / 1e9:7.2f} {top1:>6s}  "
                     f"{r['paper_name'] or ''}")
    lines.append("GFLOPs: multiply-accumulates of one 224x224 image (stem counted with the kernel's full "
                 "area, unlike the original flops()); top-1: published ImageNet-1k, 300 epochs.")
    return "\n".join(lines)


def run(args) -> int:
    rows = model_table(args.filter)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        print(format_table(rows))
    return 0
