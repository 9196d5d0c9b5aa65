"""``--checkpoint-hist K``: the K best epoch checkpoints kept as ``checkpoint-<epoch>.pth`` (timm's CheckpointSaver).

Ranking is timm's: by the epoch's top-1 (``test_acc1``, the model's own accuracy that epoch, not the running
``max_accuracy``), best first; an epoch enters only when fewer than K are kept or it is strictly better than the
worst kept one, so on a tie the earlier epoch stays. The history file is a hard link to the ``checkpoint.pth``
just committed (no second copy on disk; the later rename of a new ``checkpoint.pth`` over that name leaves the
link holding this epoch), or a copy where the file system has no hard links.

What the run kept is recorded in ``checkpoint_hist.json`` (written atomically), with each file's inode: a resumed
run continues the same ranking, and only a file this run wrote, still the same file, is ever deleted; a
``checkpoint-7.pth`` the user put there (or replaced) is left alone. The record is written before the files are
touched, with the step in flight as ``pending``, so a kill at any point is finished on the next epoch: a pending
file that exists is adopted and its evictions are done, a pending file never written is forgotten.
"""
import glob
import json
import logging
import math
import os
import shutil
import uuid
from typing import List, Optional

from ..errors import SpachError
from ..files import os_error_reason
from .checkpoint import CHECKPOINT_NAME, atomic_write

__all__ = ["keep_history", "update_history", "history_name", "HISTORY_NAME", "HISTORY_PATTERN"]

logger = logging.getLogger("spach.train")

HISTORY_NAME = "checkpoint_hist.json"
HISTORY_PATTERN = "checkpoint-*.pth"  # what `spach average` looks for by default
_MAX_RECORD_BYTES = 2 ** 20


def history_name(epoch: int) -> str:
    return f"checkpoint-{epoch}.pth"


def keep_history(output, epoch: int, log_stats: dict) -> None:
    """Rank 0, after ``checkpoint.pth`` of ``epoch`` is committed: update the history of ``--checkpoint-hist``
    (``output``: the run's :class:`~spach.train.config.OutputConfig`).

    A failure here warns in one line and training goes on: the epoch is already saved (checkpoint.pth is the
    resume point, best.pth the best weights), and the history holds only extra copies for averaging, so stopping
    a long run for one would cost more than it saves. A disk that is really full stops the run at the next
    checkpoint.pth anyway, with that failure's own message."""
    if not output.checkpoint_hist or not output.output_dir:
        return
    try:
        update_history(output.output_dir, epoch, log_stats.get("test_acc1"), output.checkpoint_hist)
    except (OSError, SpachError) as e:
        detail = os_error_reason(e) if isinstance(e, OSError) else str(e)
        logger.warning(f"checkpoint history (--checkpoint-hist) not updated for epoch {epoch}: "
                       f"{getattr(e, 'filename', None) or output.output_dir} {detail}; training goes on "
                       f"(checkpoint.pth is saved)")


def _entry_ok(e) -> bool:
    return (isinstance(e, dict) and isinstance(e.get("epoch"), int) and not isinstance(e["epoch"], bool)
            and 0 <= e["epoch"] < 10 ** 7 and isinstance(e.get("acc1"), (int, float))
            and not isinstance(e["acc1"], bool) and math.isfinite(e["acc1"])
            and (e.get("inode") is None or isinstance(e["inode"], int)))


def _read_record(folder: str) -> dict:
    """The record, checked (it is a file on disk: untrusted). A damaged one is set aside with a warning and the
    history starts empty: files are deleted only on a record that reads right."""
    path = os.path.join(folder, HISTORY_NAME)
    if not os.path.lexists(path):
        return {"kept": [], "pending": None}
    from ..files import open_regular
    try:
        if os.path.islink(path):  # not one spach made (it writes the record by rename)
            raise ValueError("a symbolic link")
        with open_regular(path) as f:
            record = json.loads(f.read(_MAX_RECORD_BYTES + 1))
        kept, pending = record["kept"], record.get("pending")
        if not (isinstance(kept, list) and all(_entry_ok(e) for e in kept)
                and len({e["epoch"] for e in kept}) == len(kept)):
            raise ValueError("malformed 'kept'")
        if pending is not None and not (_entry_ok(pending) and isinstance(pending.get("evict"), list)
                                        and all(_entry_ok(e) for e in pending["evict"])):
            raise ValueError("malformed 'pending'")
        return {"kept": kept, "pending": pending}
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning(f"{path} is damaged or not spach's ({type(e).__name__}: {str(e)[:80]}): the "
                       f"checkpoint history starts afresh and no existing checkpoint-<epoch>.pth is deleted")
        return {"kept": [], "pending": None}


def _write_record(folder: str, kept: list, pending: Optional[dict]) -> None:
    text = json.dumps({"version": 1, "kept": kept, "pending": pending}, indent=1) + "\n"
    atomic_write(os.path.join(folder, HISTORY_NAME), lambda f: f.write(text.encode()), what="checkpoint history")


def _inode(path: str) -> Optional[int]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino if not os.path.islink(path) else None


def _ours(folder: str, entry: dict) -> bool:
    """Whether the history file of ``entry`` is still the file this run wrote (same inode, not a link)."""
    inode = entry.get("inode")
    return inode is not None and _inode(os.path.join(folder, history_name(entry["epoch"]))) == inode


def _remove(folder: str, entry: dict) -> None:
    path = os.path.join(folder, history_name(entry["epoch"]))
    if _ours(folder, entry):
        os.remove(path)
    elif os.path.lexists(path):
        logger.warning(f"{path} is no longer the file this run wrote: left alone (not counted in the "
                       f"checkpoint history)")


def _duplicate(src: str, dst: str) -> None:
    """``dst`` becomes this epoch's checkpoint: a hard link to ``src`` (a copy where links are unsupported), put in
    place by rename, so a kill never leaves a partial file under ``dst``."""
    folder, name = os.path.dirname(dst), os.path.basename(dst)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")  # atomic_write's pattern: stale ones are swept
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network and FUSE file systems, FAT): a copy
        def copy(f):
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 2 ** 22)
        atomic_write(dst, copy, what="checkpoint history file")
        return
    try:
        os.replace(tmp, dst)
    except OSError:
        os.remove(tmp)
        raise


def _rank(entries: List[dict]) -> List[dict]:
    """Best first; ties: the earlier epoch first (timm keeps the earlier one)."""
    return sorted(entries, key=lambda e: (-e["acc1"], e["epoch"]))


def _settle(folder: str, record: dict) -> List[dict]:
    """The kept list after finishing what a killed run left ``pending``, each entry still this run's file."""
    kept, pending = record["kept"], record["pending"]
    if pending is not None:
        inode = _inode(os.path.join(folder, history_name(pending["epoch"])))
        # the step was under way: the name was free or ours when it began (checked), so a file there is ours; it
        # is the new one unless it is still the superseded file of a rerun epoch (kill before the rename)
        if inode is not None and not any(e["epoch"] == pending["epoch"] and e["inode"] == inode for e in kept):
            for e in pending["evict"]:
                if e["epoch"] != pending["epoch"]:  # that name now holds the new file
                    _remove(folder, e)
            evicted = {e["epoch"] for e in pending["evict"]}
            entry = {k: pending[k] for k in ("epoch", "acc1")}
            entry["inode"] = inode
            kept = [e for e in kept if e["epoch"] not in evicted and e["epoch"] != entry["epoch"]] + [entry]
    still = []
    for e in kept:
        if _ours(folder, e):
            still.append(e)
        elif os.path.lexists(os.path.join(folder, history_name(e["epoch"]))):
            logger.warning(f"{os.path.join(folder, history_name(e['epoch']))} was replaced since this run "
                           f"wrote it: left alone, and no longer counted in the checkpoint history")
    return _rank(still)


def update_history(folder: str, epoch: int, acc1, k: int) -> List[dict]:
    """Add ``epoch`` (top-1 ``acc1``) to the history of ``folder``, keeping the ``k`` best; returns the kept
    entries (``epoch``, ``acc1``, ``inode``), best first. ``checkpoint.pth`` must be this epoch's."""
    if not (isinstance(acc1, (int, float)) and math.isfinite(acc1)):
        raise SpachError(f"epoch {epoch} has no finite test_acc1 to rank it by")
    for tmp in glob.glob(os.path.join(glob.escape(folder), ".checkpoint-*.pth.*.tmp")):  # of a killed _duplicate
        try:
            os.remove(tmp)
        except OSError:
            pass
    before = kept = _settle(folder, _read_record(folder))
    # a rerun of epochs already recorded (a resume from an earlier checkpoint) supersedes their entries
    stale = [e for e in kept if e["epoch"] >= epoch]
    kept = [e for e in kept if e["epoch"] < epoch]
    new = {"epoch": epoch, "acc1": float(acc1), "inode": None}
    # timm's rule: in while there is room, else only when strictly better than the worst kept
    enters = len(kept) < k or new["acc1"] > kept[k - 1]["acc1"]
    ranked = _rank(kept + [new]) if enters else kept
    evict = stale + ranked[k:]
    keep = ranked[:k]
    target = os.path.join(folder, history_name(epoch))
    if enters and os.path.lexists(target) and not any(e["epoch"] == epoch for e in stale):
        logger.warning(f"{target} exists and was not written by this run: left alone, and epoch {epoch} "
                       f"is not added to the checkpoint history")
        enters, keep, evict = False, kept[:k], stale + kept[k:]
    if enters:
        # the intent first, beside the list as it stands: a kill from here on is finished (the new file is in
        # place) or forgotten (it is not: the list stands) by the next update
        _write_record(folder, before, {"epoch": epoch, "acc1": new["acc1"], "evict": evict})
        for e in stale:  # the superseded file of this very epoch is replaced by the rename below
            if e["epoch"] != epoch:
                _remove(folder, e)
        _duplicate(os.path.join(folder, CHECKPOINT_NAME), target)
        new["inode"] = _inode(target)
        for e in evict:
            if e["epoch"] != epoch:
                _remove(folder, e)
    else:
        for e in evict:
            _remove(folder, e)
    _write_record(folder, keep, None)
    logger.info("checkpoint history: " + ", ".join(f"{history_name(e['epoch'])} ({e['acc1']:.2f}%)" for e in keep))
    return keep
