"""The run's output folder: its checks, its owner (the lock), the logs and ``config.yaml``.

A folder that exists may be another run's: its lock is taken first (:func:`prepare_output`), so a second run
is refused before any work. A new folder is created and locked only once the configuration, the data, the model
and the checkpoint to resume have been checked (:func:`take_output_dir`): a failed check leaves nothing behind.
"""
import logging
import os
import sys
from typing import Optional

from ..errors import SpachError
from ..files import folder_write_problem, open_own, os_error_reason, regular_file_problem
from ..runtime import device as devices
from ..runtime.device import DistInfo
from .checkpoint import BEST_NAME, CHECKPOINT_NAME, RECOVERY_NAME, atomic_write
from .config import OutputConfig, RunConfig
from .config_file import config_yaml
from .history import HISTORY_NAME
from .output_lock import OutputDirLock

__all__ = ["setup_logging", "attach_log_file", "prepare_output", "take_output_dir", "on_main", "write_config",
           "CONFIG_NAME"]

CONFIG_NAME = "config.yaml"


class _EarlyLines(logging.Handler):
    """Keeps the lines logged before the output folder exists, for :func:`attach_log_file` to write first."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def setup_logging(is_main: bool, log_file: Optional[str] = None, defer_file: bool = False):
    """Log to stdout (rank 0) / stderr (warnings of other ranks), and on rank 0 to ``log_file``; with
    ``defer_file`` the file is opened later by :func:`attach_log_file`, with the lines logged until then."""
    root = logging.getLogger("spach")
    for h in list(root.handlers):
        if getattr(h, "_spach", False):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.INFO)
    root.propagate = False
    out = logging.StreamHandler(sys.stdout if is_main else sys.stderr)
    out.setLevel(logging.INFO if is_main else logging.WARNING)
    out.setFormatter(logging.Formatter("%(message)s"))
    out._spach = True
    root.addHandler(out)
    if log_file and is_main:
        if defer_file:
            early = _EarlyLines()
            early._spach = True
            root.addHandler(early)
        else:
            attach_log_file(log_file)


class _OwnFileHandler(logging.StreamHandler):
    """A log file opened by :func:`~spach.files.open_own` (appending; never through a link)."""

    def __init__(self, path: str):
        fd = open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what="log file")
        super().__init__(os.fdopen(fd, "a", encoding="utf-8"))

    def close(self):
        try:
            self.flush()
            self.stream.close()
        finally:
            super().close()


def attach_log_file(log_file: str):
    root = logging.getLogger("spach")
    fh = _OwnFileHandler(log_file)
    fh.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
    fh._spach = True
    for h in list(root.handlers):
        if isinstance(h, _EarlyLines):
            for record in h.records:
                fh.handle(record)
            root.removeHandler(h)
    root.addHandler(fh)


def prepare_output(out: OutputConfig, dist: DistInfo, eval_only: bool, lock: Optional[OutputDirLock] = None):
    """Check ``--output_dir`` and start logging; returns (whether the run writes checkpoints, whether it owns the
    folder already)."""
    save = bool(out.output_dir) and not eval_only
    setup_logging(dist.is_main, os.path.join(out.output_dir, "log_rank0.txt") if save else None, defer_file=save)
    owned = False
    if save:
        _check_output_dir(out.output_dir, create=False)
        lock = lock if lock is not None else OutputDirLock(out.output_dir)
        owned = on_main(dist, lambda: os.path.isdir(out.output_dir) and bool(lock.acquire())
                        and _check_own_files(out.output_dir) is None)
    return save, bool(owned)


def _check_output_dir(path: str, create: bool = True):
    """Refuse an --output_dir that cannot be used; create it only with ``create``."""
    if os.path.islink(path) and not os.path.exists(path):
        raise SpachError(f"--output_dir {path} is a symbolic link to {os.readlink(path)}, which does not exist: "
                         f"create that folder, remove the link, or pass another folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise SpachError(f"--output_dir {path} is a file: pass a folder path (it is created if missing)")
    if not create:
        parent = os.path.abspath(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise SpachError(f"cannot create --output_dir {path}: {parent} is a file; pick another folder")
        problem = folder_write_problem(parent)
        if problem:
            what = problem if parent == os.path.abspath(path) else f"cannot be created: {parent} {problem}"
            raise SpachError(f"--output_dir {path} {what}: fix the permissions or pick another folder")
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SpachError(f"cannot create --output_dir {path}: it {os_error_reason(e)}; pick a writable folder") from None
    problem = folder_write_problem(path)
    if problem:
        raise SpachError(f"--output_dir {path} {problem}: fix it or pick another folder")


def on_main(dist: DistInfo, fn):
    """``fn()`` on rank 0 (the rank that owns the folder); its result, or the SpachError it raises, reaches every
    rank (the others would otherwise wait forever)."""
    error = result = None
    if dist.is_main:
        try:
            result = fn()
        except SpachError as e:
            error = str(e)
    error, result = devices.broadcast_object((error, result))
    if error:
        raise SpachError(error)
    return result


def take_output_dir(cfg: RunConfig, dist: DistInfo, lock: Optional[OutputDirLock]):
    """Create --output_dir and make this run its owner; remove the temp files of a killed write (only the
    owner may: they could be another live run's); start writing log_rank0.txt; write config.yaml."""
    folder = cfg.output.output_dir
    lock = lock if lock is not None else OutputDirLock(folder)

    def take():
        _check_output_dir(folder)
        _check_own_files(folder)
        lock.acquire()
        _remove_stale_temp_files(folder)
        attach_log_file(os.path.join(folder, "log_rank0.txt"))
        write_config(cfg, os.path.join(folder, CONFIG_NAME))
    on_main(dist, take)


# the files a run writes in its folder: each is absent or a regular file this project wrote, never a link
OWN_NAMES = (CHECKPOINT_NAME, BEST_NAME, RECOVERY_NAME, CONFIG_NAME, "log.txt", "log_rank0.txt", HISTORY_NAME)


def _check_own_files(folder: str):
    """Refuse, before any work is written, a folder where one of the run's own names is a link or not a file
    (written through or over, a user's file or folder would be lost)."""
    for name in OWN_NAMES:
        path = os.path.join(folder, name)
        if os.path.islink(path):
            raise SpachError(f"{path} is a symbolic link: spach writes its own files only where it made them; "
                             f"remove the link (or pass another --output_dir)")
        if os.path.lexists(path) and not os.path.isfile(path):
            raise SpachError(f"{path} {regular_file_problem(path)}: a run writes its {name} there; move it away "
                             f"(or pass another --output_dir)")


def _remove_stale_temp_files(folder: str):
    """Temp files of a write that was killed midway (the file itself is intact)."""
    for name in os.listdir(folder):
        if name.endswith(".tmp") and name.startswith(tuple(f".{n}." for n in (CHECKPOINT_NAME, BEST_NAME, RECOVERY_NAME,
                                                                              CONFIG_NAME))):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def write_config(cfg: RunConfig, path: str):
    """``config.yaml``: the whole resolved configuration, atomically, under a header naming the versions and the
    command; ``spach train --config path --output_dir NEW`` reruns the run."""
    import torch
    from .. import __version__
    header = [f"spach {__version__}, torch {torch.__version__}: the resolved configuration of this run",
              "command: " + (" ".join(cfg.command) or "(not from the command line)"),
              f"rerun: spach train --config {path} --output_dir NEW_FOLDER"]
    text = config_yaml(cfg, header)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), what="config file")
