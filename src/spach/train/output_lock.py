"""One owner per ``--output_dir``: a second run on the same folder is refused at once.

Two runs writing one folder mix their results (``best.pth`` from one, ``checkpoint.pth`` from the other, both
appending to ``log.txt``) or delete each other's temporary checkpoint files. The run that owns the folder keeps
``<output_dir>/.spach.lock``:

- an exclusive POSIX record lock (``fcntl.lockf``) on it, held for the life of the process. The kernel drops it
  when the process dies in any way (``kill -9`` included), it is not inherited by forked loader workers (so an
  orphaned worker cannot keep it), and network file systems that support locking (NFSv4, Lustre, CephFS, GPFS)
  enforce it across hosts;
- a record of the owner in the file (host, boot id, pid, process start time, start date, command), so a refusal
  can name it, and so that ownership can be judged where the lock itself is not enforced (NFS mounted with
  ``nolock``, some FUSE file systems): on the same host (same hostname and boot id) the owner is alive when
  its pid still runs with the recorded start time; on another host when the file's modification time, which
  the owner refreshes every :data:`HEARTBEAT_S` seconds, is younger than :data:`STALE_S` seconds, measured
  with the file server's clock (a probe file written next to it), so clock skew between hosts does not matter.

A lock left by a run that died (``kill -9``, a crashed node, a rebooted host) is taken over with a log line;
one from another host that stopped is taken over once its heartbeat is :data:`STALE_S` seconds old. Only the
process that writes the folder (rank 0 under torchrun) takes the lock.
"""
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Optional

from ..errors import SpachError
from ..files import open_own, os_error_reason

__all__ = ["LOCK_NAME", "HEARTBEAT_S", "STALE_S", "OutputDirLock"]

logger = logging.getLogger("spach.train")

LOCK_NAME = ".spach.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0
# errors that mean "this file system does not do record locks", not "someone holds it"
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (None if it does not exist or is unknown):
    with the boot id it tells a live owner from a new process that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def _me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "start_ticks": _start_ticks(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(sys.argv)[:500]}


def _server_now(folder: str) -> float:
    """The file server's current time: the mtime of a probe file written now (falls back to the local clock)."""
    probe = os.path.join(folder, f"{LOCK_NAME}.now.{socket.gethostname()}.{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, b"x")
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError:
        return time.time()


def describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


class OutputDirLock:
    """``acquire()`` makes this process the owner of ``folder`` (which must exist) or raises a one-line
    :class:`SpachError` naming the folder and the process holding it; ``release()`` gives it up."""

    def __init__(self, folder: str, label: str = "--output_dir"):
        self.folder, self.label = folder, label
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd = None
        self._stop = threading.Event()
        self._thread = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self):
        if self._fd is not None:
            return self
        for _ in range(20):  # the file may be released (removed) between our open and our lock: try again
            existed = os.path.lexists(self.path)
            fd = open_own(self.path, os.O_RDWR | os.O_CREAT, what=f"{self.label} {self.folder}: its lock file")
            try:
                enforced = self._try_lock(fd)
                if enforced is None:  # locked by a live process (this host, or a file system that shares locks)
                    holder = self._read(fd)
                    raise SpachError(self._in_use(holder, "it holds the folder's lock"))
                try:
                    same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same_file = False
                if not same_file:
                    os.close(fd)
                    fd = None
                    continue
                holder = self._read(fd)
                if holder:
                    alive, why = self._alive(holder, os.fstat(fd).st_mtime)
                    if alive:
                        raise SpachError(self._in_use(holder, why))
                    logger.info(f"{self.folder}: taking over the lock of an earlier run that did not release it "
                                f"({describe(holder)}; {why})")
                self._write_record(fd, existed)
                self._fd, fd = fd, None
                self._start_heartbeat()
                return self
            finally:
                if fd is not None:
                    os.close(fd)
        raise SpachError(f"{self.label} {self.folder}: could not take its lock {self.path} (it keeps being replaced "
                         f"by another process): make sure no other run uses the folder, or pass another folder")

    def release(self):
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.remove(self.path)  # removed while still locked: no other run can hold a removed file
        except OSError:
            pass
        try:
            os.close(self._fd)  # drops the record lock
        except OSError:
            pass
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    # --- internals -----------------------------------------------------------------------------------
    @staticmethod
    def _try_lock(fd) -> Optional[bool]:
        """True: locked; False: the file system does not support record locks; None: someone else holds it."""
        import fcntl
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return None
            if e.errno in _NO_LOCKING:
                return False
            raise

    @staticmethod
    def _read(fd) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 65536)
            holder = json.loads(data.decode("utf-8")) if data.strip() else {}
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError, UnicodeDecodeError):
            return {}  # a record torn by a crash mid-write: no live owner wrote it

    def _write_record(self, fd, existed: bool):
        try:
            self._write(fd, _me())
        except OSError as e:  # a full disk, a quota: leave no empty lock file behind that was not there before
            if not existed:
                try:
                    os.remove(self.path)
                except OSError:
                    pass
            raise SpachError(f"{self.label} {self.folder}: its lock file {self.path} {os_error_reason(e)}; nothing "
                             f"was started: free space or fix the folder, then rerun") from None

    @staticmethod
    def _write(fd, record: dict):
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)

    def _alive(self, holder: dict, mtime: float):
        """Whether the process recorded in ``holder`` may still own the folder, and why."""
        me = _me()
        pid = holder.get("pid")
        if not (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2 ** 31):
            # os.kill(-1 or 0, 0) would test every process or the process group: no process is named here
            return False, f"its record names no process that can exist (pid {pid!r:.20})"
        if holder.get("host") == me["host"] and holder.get("boot_id") == me["boot_id"] and isinstance(pid, int):
            if pid == me["pid"] and holder.get("start_ticks") == me["start_ticks"]:
                return False, "it is this process"
            ticks = _start_ticks(pid)
            alive = _pid_alive(pid) and (ticks is None or holder.get("start_ticks") in (None, ticks))
            return alive, ("it still runs" if alive else "that process no longer runs")
        if holder.get("host") == me["host"] and holder.get("boot_id") and holder.get("boot_id") != me["boot_id"]:
            return False, "this host has rebooted since"
        age = max(0.0, _server_now(self.folder) - mtime)
        if age < STALE_S:
            return True, (f"its last heartbeat was {age:.0f} s ago; a lock whose heartbeat stops for {STALE_S:.0f} s "
                          f"is taken over")
        return False, f"its last heartbeat was {age:.0f} s ago"

    def _in_use(self, holder: dict, why: str) -> str:
        who = describe(holder) if holder else "a process that has not written its record yet"
        return (f"{self.label} {self.folder} is in use by another run ({who}; {why}): wait for it to finish or "
                f"stop it, or pass another folder")

    def _start_heartbeat(self):
        self._stop.clear()

        def beat(fd=self._fd):
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(fd)  # mtime = now on the file server: tells other hosts the owner is alive
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="spach-output-lock", daemon=True)
        self._thread.start()
