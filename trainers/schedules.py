"""Training schedules: a schedule turns the config into a list of stages that the trainer runs in order.

Each stage gets a fresh learning-rate schedule (warmup + linear decay over the stage's steps) and
its own ``sparse_lambda``. ``constant`` is one stage; later schedules (xi stages, alpha doubling)
register a builder in :data:`SCHEDULES` and their config schema in ``trainers.config``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One phase of training."""

    name: str
    epochs: int                   # passes over the training data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps of this stage; None = epochs x steps per epoch
    sparse_lambda: float = 0.0    # soft-threshold strength of the gate optimizer in this stage
    reset_optimizers: bool = False  # start the stage with fresh optimizer moments


def constant_stages(cfg: Any) -> list[Stage]:
    """Plain training: one stage with the trainer's epochs/max_steps and the top-level sparse_lambda."""
    return [Stage("train", cfg.trainer.epochs, cfg.trainer.max_steps, float(cfg.sparse_lambda))]


SCHEDULES: dict[str, Callable[[Any], list[Stage]]] = {"constant": constant_stages, "alpha_doubling": constant_stages}


def _alpha_doubling_hooks(cfg: Any) -> list[Any]:
    from trainers.alpha_doubling import alpha_doubling_callbacks

    return alpha_doubling_callbacks(cfg)


# schedules that also change something during training register their TrainerCallbacks here
SCHEDULE_CALLBACKS: dict[str, Callable[[Any], list[Any]]] = {"alpha_doubling": _alpha_doubling_hooks}


def build_stages(cfg: Any) -> list[Stage]:
    """The stages of ``cfg.schedule``."""
    return SCHEDULES[cfg.schedule.name](cfg)


def schedule_callbacks(cfg: Any) -> list[Any]:
    """The TrainerCallbacks of ``cfg.schedule`` (none for most schedules)."""
    build = SCHEDULE_CALLBACKS.get(cfg.schedule.name)
    return build(cfg) if build else []
