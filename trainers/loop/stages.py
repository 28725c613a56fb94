"""A stage is one phase of training with its own learning-rate schedule; a schedule is a list of stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One phase of training.

    ``params`` carries values a method plug-in applies when the stage begins (e.g. a sparsity strength
    per stage); the loop itself never reads them.
    """

    name: str
    epochs: int                   # passes over the training data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps of this stage; None = epochs x steps per epoch
    params: dict[str, Any] = field(default_factory=dict)
    reset_optimizers: bool = False  # start the stage with fresh optimizer moments
