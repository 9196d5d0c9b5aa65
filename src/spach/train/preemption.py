"""Stopping a run when asked: SIGTERM (a spot instance's notice, ``scancel``, torchrun passing its own on),
SIGUSR1 (SLURM's ``--signal=USR1@90``) and SIGINT (Ctrl-C).

The handler only notes the signal. The training loop asks :meth:`Preemption.agreed` after every optimizer step;
every rank then stops after the same step, whichever rank (or how many) received the signal: each step's flags
are summed over the ranks with a non-blocking all-reduce on a host (gloo) group, and the sum is read one step
later, so asking costs no wait for the device or for the other ranks. The run then writes a recovery checkpoint
and exits with :data:`EXIT_PREEMPTED`. A second SIGINT interrupts at once (the user insists), as Python does.
"""
import logging
import os
import signal
import threading
from typing import Optional

import torch

from ..runtime import device as devices

__all__ = ["Preemption", "EXIT_PREEMPTED", "SIGNALS"]

logger = logging.getLogger("spach.train")

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, rerun the same command to continue
SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None)


class Preemption:
    """Signal handlers for one run (installed by :meth:`install`, put back by :meth:`restore`)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}
        self._group = None
        self._flag = None
        self._pending = None

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (a library caller's thread)
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._group = devices.host_group()
        return self

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if self.received is None:
            self.received = signum
            # a logging or print call here could re-enter a stream the interrupted code is writing: a raw write
            os.write(2, f"spach: {signal.Signals(signum).name} received: stopping after the current "
                        f"step\n".encode())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"

    def agreed(self) -> bool:
        """Whether every rank stops now. One process: as soon as a signal arrived. Several: when the flags sent
        one step ago say a rank had one then (every rank reads the same sum at the same step)."""
        if self._group is None:
            return self.received is not None
        stop = False
        if self._pending is not None:
            self._pending.wait()
            stop = self._flag.item() > 0
        self._flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        self._pending = torch.distributed.all_reduce(self._flag, group=self._group, async_op=True)
        return stop

    def agreed_now(self) -> bool:
        """Whether any rank has received a signal, agreed with a blocking all-reduce (at an epoch's end)."""
        if self._group is None:
            return self.received is not None
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, group=self._group)
        return flag.item() > 0
