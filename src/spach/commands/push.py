"""Upload a model folder written by `spach export --format hf` to the Hugging Face Hub.

The folder is checked first (its config.json and weights must open as spach reads them), the model card's
placeholder repo id (hf-hub:ORG/NAME) becomes the real one, the repo is created if missing, and the folder goes up
in one commit with huggingface_hub's own upload_folder. Needs huggingface_hub (pip install 'spach[hf]') and a
Hugging Face token with write access (`hf auth login`, or HF_TOKEN).

examples:
  spach export --checkpoint output/best.pth --format hf --output my-model
  spach push my-model --repo my-org/spach-ms-xxs-flowers
"""
import os
import re

from ..errors import SpachError
from ._help import use_help_formatter

CARD = "README.md"
PLACEHOLDER = "hf-hub:ORG/NAME"


def add_arguments(parser):
    use_help_formatter(parser)
    parser.add_argument("folder", metavar="FOLDER", help="a folder written by spach export --format hf")
    parser.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hugging Face model repo to upload to")
    parser.add_argument("--private", action="store_true", help="create the repo private (when it does not exist)")
    parser.add_argument("--message", default="Upload model exported by spach", help="the commit message")


def run(args) -> int:
    from ..weights import HF_INSTALL, open_weights
    if not re.fullmatch(r"[\w.\-]{1,96}/[\w.\-]{1,96}", args.repo):
        raise SpachError(f"--repo {args.repo} is not a Hugging Face repo id: write ORG/NAME")
    if not os.path.isdir(args.folder):
        raise SpachError(f"{args.folder} is not a folder: pass a folder written by spach export --format hf")
    weights = open_weights(args.folder)  # a folder spach (and timm) cannot load is not uploaded
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise SpachError(f"spach push uploads with huggingface_hub, which is not installed: {HF_INSTALL}") from None
    token = get_token()
    if not token:
        raise SpachError("spach push needs a Hugging Face token with write access: run `hf auth login` or set "
                         "HF_TOKEN")
    card = os.path.join(args.folder, CARD)
    if os.path.isfile(card):  # the card's usage lines name the repo they are read from
        with open(card) as f:
            text = f.read()
        if PLACEHOLDER in text:
            with open(card, "w") as f:
                f.write(text.replace(PLACEHOLDER, f"hf-hub:{args.repo}"))
    api = HfApi(token=token)
    try:
        api.create_repo(args.repo, private=args.private, exist_ok=True)
        commit = api.upload_folder(repo_id=args.repo, folder_path=args.folder, commit_message=args.message)
    except Exception as e:  # network, permissions, quota: huggingface_hub's own error types
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else "no detail"
        raise SpachError(f"uploading {args.folder} to {args.repo} failed ({type(e).__name__}: {detail}): check the "
                         f"token's write access and the network") from None
    print(f"uploaded {args.folder} ({weights.facts.get('model')}) to https://huggingface.co/{args.repo} "
          f"({getattr(commit, 'oid', '')[:12]}): load it with timm.create_model('hf-hub:{args.repo}', "
          f"pretrained=True) after import spach")
    return 0
