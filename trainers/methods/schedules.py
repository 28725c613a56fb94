"""Training schedules (the ``schedule`` config group): each turns the config into the stages the loop runs,
and may add callbacks.

- ``constant``: one stage with the trainer's epochs / max_steps.
- ``xi_stages`` (SoRA's Algorithm 1): one stage per xi value with ``sparse_lambda = xi`` as a stage
  parameter, each with a fresh learning-rate schedule; needs a method that takes ``sparse_lambda``.
- ``alpha_doubling``: one stage; ``lora_alpha`` grows after every epoch (:mod:`trainers.methods.alpha_doubling`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from omegaconf import MISSING, DictConfig

from trainers.core.errors import UserError
from trainers.loop.hooks import TrainerCallback
from trainers.loop.stages import Stage
from trainers.methods.base import require

MAX_STAGES = 1000


@dataclass
class ConstantScheduleSchema:
    name: str = MISSING


@dataclass
class XiStagesScheduleSchema:
    name: str = MISSING
    xi_start: float = MISSING
    xi_max: float = MISSING
    xi_step: float = MISSING
    epochs_per_stage: int = MISSING
    max_steps_per_stage: int | None = MISSING
    reset_optimizers: bool = MISSING


@dataclass
class AlphaDoublingScheduleSchema:
    name: str = MISSING
    alpha_start: float = MISSING
    alpha_growth: float = MISSING


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


class Schedule:
    """One plain stage; subclasses override what they change."""

    name: ClassVar[str] = "constant"
    schema: ClassVar[type] = ConstantScheduleSchema

    def check(self, cfg: DictConfig, stage_params: tuple[str, ...]) -> None:
        """``stage_params``: the stage parameters the run's method understands."""

    def stages(self, cfg: Any) -> list[Stage]:
        return [Stage("train", cfg.trainer.epochs, cfg.trainer.max_steps)]

    def callbacks(self, cfg: Any) -> list[TrainerCallback]:
        return []


class XiStages(Schedule):
    name = "xi_stages"
    schema = XiStagesScheduleSchema

    def check(self, cfg: DictConfig, stage_params: tuple[str, ...]) -> None:
        schedule = cfg.schedule
        require("sparse_lambda" in stage_params, f"schedule=xi_stages schedules SoRA's gate sparsity; it needs "
                                                 f"adapter=sora (got adapter={cfg.adapter.name})")
        require(0 <= schedule.xi_start <= schedule.xi_max and schedule.xi_step > 0,
                f"schedule.xi_start/xi_max/xi_step must satisfy 0 <= xi_start <= xi_max and xi_step > 0 "
                f"(got {schedule.xi_start}, {schedule.xi_max}, {schedule.xi_step})")
        require(schedule.epochs_per_stage > 0 or (schedule.max_steps_per_stage or 0) > 0,
                "schedule.epochs_per_stage or schedule.max_steps_per_stage must be > 0")
        require(schedule.max_steps_per_stage is None or schedule.max_steps_per_stage > 0,
                f"schedule.max_steps_per_stage must be null or > 0 (got {schedule.max_steps_per_stage})")
        try:
            xi_values(schedule.xi_start, schedule.xi_max, schedule.xi_step)
        except ValueError as exc:
            raise UserError(f"schedule: {exc}") from None

    def stages(self, cfg: Any) -> list[Stage]:
        """One stage per xi value with ``sparse_lambda = xi``, ``epochs_per_stage`` epochs (or
        ``max_steps_per_stage`` steps) each; the trainer gives every stage a fresh lr schedule."""
        sched = cfg.schedule
        values = xi_values(float(sched.xi_start), float(sched.xi_max), float(sched.xi_step))
        return [Stage(f"{i}-xi{xi:g}", int(sched.epochs_per_stage), sched.max_steps_per_stage,
                      {"sparse_lambda": xi}, bool(sched.reset_optimizers)) for i, xi in enumerate(values)]


class AlphaDoublingSchedule(Schedule):
    name = "alpha_doubling"
    schema = AlphaDoublingScheduleSchema

    def check(self, cfg: DictConfig, stage_params: tuple[str, ...]) -> None:
        require(cfg.schedule.alpha_start > 0, f"schedule.alpha_start must be > 0 (got {cfg.schedule.alpha_start})")
        require(cfg.schedule.alpha_growth > 0, f"schedule.alpha_growth must be > 0 (got {cfg.schedule.alpha_growth})")

    def callbacks(self, cfg: Any) -> list[TrainerCallback]:
        from trainers.methods.alpha_doubling import AlphaDoubling

        return [AlphaDoubling(cfg.schedule.alpha_start, cfg.schedule.alpha_growth)]


SCHEDULES: dict[str, Schedule] = {s.name: s for s in (Schedule(), XiStages(), AlphaDoublingSchedule())}


def get_schedule(name: str) -> Schedule:
    """The schedule called ``name``; UserError listing the known ones otherwise."""
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule.name {name!r} (choose from: {', '.join(sorted(SCHEDULES))})")
    return SCHEDULES[name]


def build_stages(cfg: Any) -> list[Stage]:
    """The stages of ``cfg.schedule``."""
    return get_schedule(cfg.schedule.name).stages(cfg)
