"""Files a user names, and the project's own files: the one place paths are opened.

Reading: only regular files, so no command can block on a FIFO or read a device. ``open()`` of a FIFO waits for
a writer forever, and a character device (``/dev/zero``, a tty) never ends; a path naming either, or a folder,
is refused with one line that says what the path really is.

Writing the project's own files (the output folder's lock, logs, config): :func:`open_own` never follows a
symbolic link (a link planted at ``out/log.txt`` would otherwise have the run overwrite whatever it points to) and
opens only a regular file. Files replaced atomically (checkpoints, ``config.yaml``) are safe by construction: a
new temporary file is created exclusively and renamed over the name, replacing a link rather than its target.
Every ``OSError`` on such a path becomes one line naming the path and the reason (:func:`os_error_reason`).
"""
import errno
import os
import stat

__all__ = ["NotARegularFile", "path_kind", "open_regular", "regular_file_problem", "open_own", "os_error_reason",
           "inside", "under", "folder_write_problem", "write_failure_reason", "space_problem"]

# OSError kinds a user's path can cause, as the words that follow the path in a message
_REASONS = {
    errno.ELOOP: "is a symbolic link (or a loop of them)",
    errno.ENAMETOOLONG: "is too long a path for this system",
    errno.EACCES: "is not accessible (permission denied)",
    errno.EPERM: "may not be changed (operation not permitted: an immutable or protected file)",
    errno.EROFS: "is on a read-only file system",
    errno.ENOSPC: "cannot be written: the disk is full",
    errno.EDQUOT: "cannot be written: the disk quota is exceeded",
    errno.EISDIR: "is a folder",
    errno.ENOTDIR: "has a file where a folder is expected on its path",
    errno.ENOENT: "does not exist",
    errno.ENXIO: "is a FIFO or device with no other end",
    errno.ETXTBSY: "is busy",
}


def os_error_reason(e: OSError) -> str:
    """The words that follow a path in a one-line message about ``e`` (any ``OSError``)."""
    return _REASONS.get(e.errno) or f"cannot be used ({e.strerror or type(e).__name__})"


class NotARegularFile(OSError):
    """The path exists but is a folder, FIFO, socket or device."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "regular file" if stat.S_ISREG(mode) else "special file"


# what a path is when it cannot be looked at, as a noun that reads after "is a"
_UNREADABLE_KINDS = {
    errno.ELOOP: "symbolic link loop",
    errno.ENAMETOOLONG: "path too long for this system",
    errno.EACCES: "path that cannot be reached (permission denied)",
}


def path_kind(path) -> str:
    """'regular file', 'folder', 'FIFO (named pipe)', 'socket', 'character device', 'block device', 'missing' (a
    broken link included), or, for a path that cannot be looked at, what it is as a noun ('symbolic link loop',
    'path too long for this system' ...): every kind reads after "is a"."""
    try:
        return _kind(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as e:  # a link loop, a name too long, a folder on the way that may not be entered ...
        return _UNREADABLE_KINDS.get(e.errno) or f"path that cannot be looked at ({e.strerror or type(e).__name__})"
    except ValueError:  # a NUL byte in the name
        return "path that is not valid (it holds a NUL character)"


def regular_file_problem(path) -> str:
    """'' for a regular file, else what is wrong with it, as words to follow the path in a message."""
    kind = path_kind(path)
    if kind == "regular file":
        return ""
    if kind == "missing":
        return "does not exist"
    return f"is a {kind}, not a file"


def under(path: str, folder: str) -> bool:
    """Whether the path string ``path`` is ``folder`` or lies under it (no links resolved: real paths in)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def inside(path, folder) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, links resolved (``path`` need not exist yet)."""
    try:
        return under(os.path.realpath(path), os.path.realpath(folder))
    except (OSError, ValueError):
        return False


def folder_write_problem(folder) -> str:
    """'' when a new file can be created in ``folder``, else why not (as words to follow the folder in a
    message): a probe file is created and removed, so a read-only mount, a full disk or missing permissions show
    up before any work, for root too (``os.access`` says yes to root on a folder it may not write)."""
    import tempfile
    try:
        fd, probe = tempfile.mkstemp(prefix=".spach-probe-", dir=folder)
    except OSError as e:
        return os_error_reason(e)
    os.close(fd)
    try:
        os.remove(probe)
    except OSError:
        pass
    return ""


def write_failure_reason(e: BaseException) -> str:
    """Why a write failed, when ``e`` (or an exception it was raised from) is the file system's doing: a full disk,
    a quota, a read-only target, missing permissions; '' for anything else. Libraries that write files (torch,
    safetensors, onnx) wrap the OSError or only keep its words."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            return os_error_reason(e)
        text = str(e)
        if "No space left on device" in text or "os error 28" in text:
            return _REASONS[errno.ENOSPC]
        if "Read-only file system" in text or "os error 30" in text:
            return _REASONS[errno.EROFS]
        e = e.__cause__ or e.__context__
    return ""


def space_problem(folder, need_bytes: int) -> str:
    """'' when ``folder``'s file system has ``need_bytes`` free, else the words for a message. Checked before a
    large write whose library cannot fail cleanly half-way (TorchScript's writer aborts the process on a full
    disk)."""
    import shutil
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    if free >= need_bytes:
        return ""
    return f"has {free / 2 ** 20:.1f} MB free, and this needs about {need_bytes / 2 ** 20:.1f} MB"


def open_own(path, flags: int, perm: int = 0o644, what: str = "file") -> int:
    """A file descriptor of one of the project's own files, opened with ``flags`` (``os.O_WRONLY | os.O_APPEND |
    os.O_CREAT``, ...): never through a symbolic link, and only a regular file (a folder, FIFO, device or socket at
    the path is refused without blocking). Any failure is :class:`~spach.errors.SpachError` naming ``what``, the
    path and the reason."""
    from .errors import SpachError
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), perm)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EEXIST and os.path.islink(path)):
            raise SpachError(f"{what} {path} is a symbolic link: spach writes its own files only where it made them; "
                             f"remove the link (or pass another folder)") from None
        raise SpachError(f"{what} {path} {os_error_reason(e)}: fix it or pass another folder") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise SpachError(f"{what} {path} is a {_kind(mode)}, not a file spach wrote: remove it (or pass another "
                         f"folder)")
    os.set_blocking(fd, True)
    return fd


def open_regular(path):
    """``open(path, 'rb')`` for a regular file; anything else raises :class:`NotARegularFile` (or the
    ``OSError`` of a missing / unreadable file) without blocking."""
    problem = regular_file_problem(path)
    if problem == "does not exist":
        raise FileNotFoundError(2, "No such file or directory", os.fspath(path))
    if problem:
        raise NotARegularFile(f"{os.fspath(path)} {problem}")
    # O_NONBLOCK: if the path was swapped for a FIFO since the check, the open still returns at once
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{os.fspath(path)} is a {_kind(mode)}, not a file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
