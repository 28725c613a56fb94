"""Named optimizers built from the parameter groups a method plug-in contributes, and their warmup schedules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class OptimizerSpec:
    """One optimizer of a run: ``build(param_groups)`` gives it; its lr schedule warms up over ``warmup_ratio``
    of each stage's steps, then decays linearly to 0, unless ``schedule(optimizer, stage_steps)`` gives another
    (e.g. cosine with a floor)."""

    name: str
    param_groups: list[dict[str, Any]]
    build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
    warmup_ratio: float
    schedule: Callable[[torch.optim.Optimizer, int], Any] | None = None


def build_optimizers(specs: list[OptimizerSpec]) -> dict[str, torch.optim.Optimizer]:
    """name -> optimizer, in the order of ``specs`` (the first one's lr is the run's logged ``lr``). Empty
    parameter groups are dropped, and so is an optimizer left with none."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"optimizer names must be unique, got {names}")
    built = {}
    for spec in specs:
        groups = [g for g in spec.param_groups if g["params"]]
        if groups:
            built[spec.name] = spec.build(groups)
    if not built:
        raise ValueError("the model has no trainable parameters; was an adapter applied?")
    return built


def build_scheduler(spec: OptimizerSpec, optimizer: torch.optim.Optimizer, num_steps: int) -> Any:
    """The lr schedule of ``spec``'s optimizer over a stage of ``num_steps`` steps."""
    if spec.schedule is not None:
        return spec.schedule(optimizer, num_steps)
    return build_warmup_scheduler(optimizer, num_steps, float(spec.warmup_ratio))


def build_warmup_scheduler(optimizer: torch.optim.Optimizer, num_steps: int,
                           warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``int(warmup_ratio * num_steps)`` steps, then linear decay to 0 (transformers)."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * num_steps), num_steps)
