"""Reading files a user names: only regular files, so no command can block on a FIFO or read a device.

``open()`` of a FIFO waits for a writer forever, and a character device (``/dev/zero``, a tty) never ends; a
path naming either, or a folder, is refused with one line that says what the path really is.
"""
import os
import stat

__all__ = ["NotARegularFile", "path_kind", "open_regular", "regular_file_problem"]


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


def path_kind(path) -> str:
    """'regular file', 'folder', 'FIFO (named pipe)', 'socket', 'character device', 'block device', or
    'missing' (a broken link included)."""
    try:
        return _kind(os.stat(path).st_mode)
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        return "missing"


def regular_file_problem(path) -> str:
    """'' for a regular file, else what is wrong with it, as words to follow the path in a message."""
    kind = path_kind(path)
    if kind == "regular file":
        return ""
    if kind == "missing":
        return "does not exist"
    return f"is a {kind}, not a file"


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
