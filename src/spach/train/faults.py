"""Fault injection for the reliability tests: stop or SIGKILL this process at a named point of a run.

Inert unless the environment variable ``SPACH_FAULT_AT`` is set (one ``os.environ`` lookup per point). It holds
comma-separated points, each ``[ACTION@]EVENT:EPOCH[:STEP]``; ACTION is ``kill`` (SIGKILL, the default: a crash
or pre-emption, nothing flushed or cleaned up), ``stop`` (SIGSTOP, so a test can change the disk under a live
run and then SIGCONT it), or ``term`` / ``usr1`` / ``int`` (SIGTERM / SIGUSR1 / SIGINT: a pre-emption notice,
which the run answers by stopping after the step). The events:

* ``epoch:E``              start of epoch E (before any of its steps)
* ``step:E:S``             step S of epoch E, after the forward pass, before backward and the optimizer update
* ``eval:E`` / ``eval-ema:E``  inside the evaluation of the model / its EMA after epoch E (after one batch)
* ``write:NAME:E``         half-way through writing NAME (``checkpoint.pth``, ``best.pth``) to its temp file
* ``saved:NAME:E``         right after NAME has been saved (renamed into place, stale temp files removed)

``SPACH_FAULT_RANK=R`` limits the faults to rank R. Under torchrun they fire on the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` 0), so a restarted group runs clean.
"""
import os
import signal

__all__ = ["set_epoch", "armed", "point"]

_epoch = 0


_ACTIONS = {"stop": signal.SIGSTOP, "term": signal.SIGTERM, "usr1": getattr(signal, "SIGUSR1", signal.SIGTERM),
            "int": signal.SIGINT}


def set_epoch(epoch: int):
    global _epoch
    _epoch = epoch


def _key(event: str, step=None) -> str:
    return f"{event}:{_epoch}" + (f":{step}" if step is not None else "")


def armed(event: str, step=None):
    """The signal to send at this point, or None (the common case: ``SPACH_FAULT_AT`` unset)."""
    spec = os.environ.get("SPACH_FAULT_AT")
    if not spec:
        return None
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    rank = os.environ.get("SPACH_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return None
    key = _key(event, step)
    for entry in spec.split(","):
        action, _, where = entry.strip().rpartition("@")
        if where == key:
            return _ACTIONS.get(action, signal.SIGKILL)
    return None


def point(event: str, step=None):
    sig = armed(event, step)
    if sig is not None:
        os.kill(os.getpid(), sig)
