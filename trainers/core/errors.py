"""The one exception type for problems the user can fix (bad config, missing files, bad checkpoint)."""

from __future__ import annotations

from typing import Any


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), cut to ``limit``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


class UserError(Exception):
    """A problem with the user's input. The CLI prints its message as one line and exits non-zero."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class NonFiniteError(UserError):
    """Training produced a non-finite loss, gradient norm, weight or evaluation loss.

    ``details`` (e.g. ``{"step": 17, "reason": "non-finite loss"}``) go into the failed run's metrics.json.
    """

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = dict(details or {})


class RunRefused(BaseException):
    """Raised by the Hydra callbacks that must stop a run before Hydra writes into its folder.

    Hydra turns ``Exception`` raised in callbacks into warnings, so this derives from BaseException;
    the CLI catches it and prints its message as one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class RunInterrupted(BaseException):
    """A signal stopped the run (``signal``: e.g. SIGTERM); ``step`` and ``checkpoint`` say where it can resume.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` records it as a failure.
    """

    def __init__(self, signal: str, step: int | None = None, checkpoint: str | None = None) -> None:
        super().__init__(f"stopped by {signal}" + (f" at step {step}" if step is not None else ""))
        self.signal, self.step, self.checkpoint = signal, step, checkpoint
