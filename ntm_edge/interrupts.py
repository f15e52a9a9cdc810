"""Stopping a long run cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers, `docker stop` and
torchrun send).

A signal does not interrupt the step it lands in. ``StopSignals`` records it, the loop asks
``requested`` between two steps, saves and raises ``Interrupted``. A KeyboardInterrupt raised in the
middle of a step would leave the random generator past draws whose update was never taken (or half
an optimizer update applied), and a checkpoint of that state does not resume bit for bit. A second
signal stops at once, without saving: the last checkpoint on disk is kept.

Exit status: 130 after SIGINT, 143 after SIGTERM (128 + the signal number, what a shell reports for
a process that the signal ended).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``saved`` tells whether a checkpoint was written first."""

    def __init__(self, signum: int, saved: bool):
        super().__init__(signal_name(signum))
        self.signum, self.saved = signum, saved

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager: while active, SIGINT and SIGTERM set ``signum`` instead of interrupting.

    Handlers can only be installed from the main thread; elsewhere this does nothing (a signal then
    acts as it would without it). A signal that is ignored when the block starts (``nohup``, a
    background job of a non-interactive shell) stays ignored.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}  # what signal.getsignal returned: a handler, SIG_DFL or None
        self._holding = 0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def received(self) -> int:
        """The signal that asked to stop (only once ``requested``)."""
        if self.signum is None:
            raise RuntimeError("no stop signal was received")
        return self.signum

    @contextmanager
    def hold(self):
        """Inside this block even a second signal only waits (a save is never cut short)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1

    def _handle(self, signum, frame) -> None:
        if self.signum is None or self._holding:
            self.signum = self.signum or signum
            return
        raise Interrupted(signum, saved=False)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_IGN:
                    self._previous[sig] = previous
                    signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: not set from Python
        self._previous.clear()
