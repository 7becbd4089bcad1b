"""Stopping a run on SIGINT / SIGTERM without losing it.

Ctrl-C, and the SIGTERM a TPU VM gets before preemption, become a request to stop at the next
step boundary; the run then saves a checkpoint and its summary and raises `RunInterrupted`
(the CLI exits with 128 + the signal's number). A second SIGINT stops at once, saving nothing.
With several processes the request is agreed at each boundary, so all of them stop at the same
step even when only one got the signal.
"""

from __future__ import annotations

import signal
import sys
import threading

from tooln1_jax import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """The run stopped at a step boundary after saving; the message says where it resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """A context manager that turns SIGINT / SIGTERM into `requested()` (restoring the previous
    handlers on exit). Handlers can only be set from the main thread; elsewhere it never fires."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum
        print(
            f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
            "(Ctrl-C again stops at once, without saving)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self) -> bool:
        """Whether any process got a signal (a collective: every process calls it together)."""
        return distributed.any_process(self.signum is not None)

    def signal_number(self) -> int:
        return self.signum if self.signum is not None else int(signal.SIGTERM)
