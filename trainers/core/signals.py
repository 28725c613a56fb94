"""Preemption: SIGTERM (what SLURM and most schedulers send before killing a job) asks the training loop to
finish its optimizer step, save a checkpoint and stop; outside the loop it stops the run at once.

``with preemption_handler():`` installs the handler (main thread only); the loop marks where a checkpointed
stop is possible with ``with stop_point():`` and polls :func:`stop_requested` once per optimizer step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from trainers.core.errors import RunInterrupted


class _State:
    armed = False                 # inside a training loop that polls stop_requested()
    requested: str | None = None  # the signal that asked to stop


def stop_requested() -> str | None:
    """The name of the signal that asked the running loop to stop (None: none did)."""
    return _State.requested


def request_stop(name: str = "SIGTERM") -> None:
    """Ask the running loop to checkpoint and stop at its next optimizer step (what the handler does)."""
    _State.requested = name


def _on_sigterm(signum: int, frame: Any) -> None:
    if _State.armed:
        request_stop("SIGTERM")
    else:
        raise RunInterrupted("SIGTERM")


@contextlib.contextmanager
def preemption_handler() -> Iterator[None]:
    """Handle SIGTERM inside the block (restoring the previous handler after it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _State.requested = None
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _State.requested = None


@contextlib.contextmanager
def stop_point() -> Iterator[None]:
    """Inside the block a SIGTERM only sets :func:`stop_requested` (the loop stops at a step boundary)."""
    armed = _State.armed
    _State.armed = True
    try:
        yield
    finally:
        _State.armed = armed
    if not armed and _State.requested is not None:  # asked while the loop was ending: stop now
        raise RunInterrupted(_State.requested)
