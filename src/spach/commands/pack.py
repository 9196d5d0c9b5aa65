"""Write an ImageFolder (DIR/train/<class>/*, DIR/val/<class>/*) as WebDataset tar shards for --data-set WDS.

spach pack DIR OUT [--shard-size 1000]: the original image bytes, unchanged, in OUT/train-000000.tar ... and
OUT/val-000000.tar ..., the class names and counts in OUT/_info.json; class indices are the ImageFolder's. An
interrupted pack leaves only complete shards: the same command again writes the rest.
"""
import sys

from ._help import use_help_formatter


def add_arguments(parser):
    use_help_formatter(parser)
    parser.usage = "spach pack DIR OUT [--shard-size N] [--seed S]"
    parser.add_argument("src", metavar="DIR", help="ImageFolder dataset with DIR/train/<class>/ and DIR/val/<class>/")
    parser.add_argument("out", metavar="OUT", help="folder for the shards and _info.json (created if missing)")
    parser.add_argument("--shard-size", "--shard_size", dest="shard_size", type=int, default=1000, metavar="N",
                        help="images per shard (1000 ImageNet JPEGs are about 110 MB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train split's order across shards")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="the ImageFolder splits to pack")


def run(args) -> int:
    from ..data.pack import pack_imagefolder
    from ..errors import SpachError
    from ..files import inside
    from ..train.output_lock import OutputDirLock
    if inside(args.out, args.src):
        raise SpachError(f"OUT {args.out} is inside DIR {args.src}: the shards would become part of the data they are "
                         f"packed from; pass an OUT outside {args.src}")
    lock = OutputDirLock(args.out, label="spach pack OUT")  # one pack per OUT: two would remove each other's files
    try:
        info = pack_imagefolder(args.src, args.out, shard_size=args.shard_size, seed=args.seed, splits=args.splits,
                                show_progress=sys.stderr.isatty(), claim=lambda out: lock.acquire())
    finally:
        lock.release()
    for name, split in info["splits"].items():
        print(f"{name}: {split['num_samples']} images in {len(split['filenames'])} shards")
    print(f"{len(info['classes'])} classes; index {args.out}/_info.json (train or eval with --data-path {args.out} "
          f"--data-set WDS)")
    return 0
