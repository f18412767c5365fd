"""Graceful stop on SIGINT / SIGTERM: the loop finishes its step, saves a checkpoint and the adapter, and exits.

The handler only sets a flag (nothing unsafe runs inside a signal handler); the loop reads it once per step,
folded into the same host sync as the non-finite check, so all processes agree on stopping at the same step.
A second signal while stopping falls back to the default behaviour (KeyboardInterrupt / termination): every
file is written atomically, so even that cannot tear the last checkpoint.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Raised after the stop checkpoint is saved; the CLI prints the message and exits 128 + signal (130, 143)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class GracefulStop:
    """Context manager: while active, SIGINT/SIGTERM set `requested` (the signal number) instead of killing."""

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.requested = signum
        for s, old in self._previous.items():  # the second signal acts at once
            signal.signal(s, old)

    def install(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._previous = {s: signal.getsignal(s) for s in SIGNALS}
            for s in SIGNALS:
                signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, old in self._previous.items():
            signal.signal(s, old)
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
