"""The one exception type for problems the user can fix (bad config, missing files, bad checkpoint)."""

from __future__ import annotations


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
