"""The one exception type for problems the user can fix (bad config, missing files, bad checkpoint)."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), cut to ``limit``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


class UserError(Exception):
    """A problem with the user's input. The CLI prints its message as one line and exits non-zero."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class RunRefused(BaseException):
    """Raised by the Hydra callbacks that must stop a run before Hydra writes into its folder.

    Hydra turns ``Exception`` raised in callbacks into warnings, so this derives from BaseException;
    the CLI catches it and prints its message as one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
