"""Training schedules: a schedule turns the config into a list of stages that the trainer runs in order.

Each stage gets a fresh learning-rate schedule (warmup + linear decay over the stage's steps) and
its own ``sparse_lambda``. ``constant`` is one stage; later schedules (xi stages, alpha doubling)
register a builder in :data:`SCHEDULES` and their config schema in ``trainers.config``.
"""

from __future__ import annotations

import math
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


MAX_STAGES = 1000


def xi_values(xi_start: float, xi_max: float, xi_step: float) -> list[float]:
    """xi_start, xi_start + xi_step, ..., up to xi_max inclusive, without float drift.

    The count is ``floor((xi_max - xi_start) / xi_step + 1e-9) + 1`` (0.0..0.5 by 0.1 gives 6 values, where
    repeated float addition would stop at 0.4 or overshoot), each value ``xi_start + i * xi_step`` rounded
    to 10 decimals.
    """
    if xi_step <= 0 or xi_start < 0 or xi_max < xi_start:
        raise ValueError(f"need 0 <= xi_start <= xi_max and xi_step > 0 (got {xi_start}, {xi_max}, {xi_step})")
    count = math.floor((xi_max - xi_start) / xi_step + 1e-9) + 1
    if count > MAX_STAGES:
        raise ValueError(f"xi_start..xi_max by xi_step gives {count} stages (more than {MAX_STAGES})")
    return [round(xi_start + i * xi_step, 10) for i in range(count)]


def xi_stages(cfg: Any) -> list[Stage]:
    """SoRA's Algorithm 1: one stage per xi value with ``sparse_lambda = xi``, ``epochs_per_stage`` epochs
    (or ``max_steps_per_stage`` steps) each; the trainer gives every stage a fresh lr schedule."""
    sched = cfg.schedule
    values = xi_values(float(sched.xi_start), float(sched.xi_max), float(sched.xi_step))
    return [Stage(f"{i}-xi{xi:g}", int(sched.epochs_per_stage), sched.max_steps_per_stage, xi,
                  bool(sched.reset_optimizers)) for i, xi in enumerate(values)]


SCHEDULES: dict[str, Callable[[Any], list[Stage]]] = {"constant": constant_stages, "xi_stages": xi_stages,
                                                       "alpha_doubling": constant_stages}


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
