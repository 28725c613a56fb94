"""Named optimizers built from the parameter groups a method plug-in contributes, and their warmup schedules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# trainer.optimizer_impl: how torch runs the AdamW update (the same math; fused / foreach batch it over tensors)
OPTIMIZER_IMPLS = {"auto": None, "fused": {"fused": True}, "foreach": {"foreach": True},
                   "for_loop": {"foreach": False, "fused": False}}


def build_adamw(groups: list[dict[str, Any]], impl: str | None = "auto",
                cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **kwargs: Any) -> torch.optim.Optimizer:
    """``cls(groups, **kwargs)`` (``torch.optim.AdamW`` or a subclass) running the ``impl`` implementation:
    ``fused`` (one kernel over all tensors: the fastest on CPUs and GPUs), ``foreach`` (batched ops),
    ``for_loop`` (one tensor at a time), or ``auto``: fused where torch supports it for these parameters
    (floating point on a CPU or GPU), else torch's default; None: torch's default. All give the same update up to
    float rounding."""
    if impl is None:
        return cls(groups, **kwargs)
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer impl must be one of {', '.join(OPTIMIZER_IMPLS)}, got {impl!r}")
    if impl != "auto":
        return cls(groups, **OPTIMIZER_IMPLS[impl], **kwargs)
    try:
        return cls(groups, fused=True, **kwargs)
    except RuntimeError:  # torch refuses fused for these parameters (device, dtype)
        return cls(groups, **kwargs)


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


def build_scheduler(spec: OptimizerSpec, optimizer: torch.optim.Optimizer, num_steps: int, name: str = "linear",
                    kwargs: dict[str, Any] | None = None) -> Any:
    """The lr schedule of ``spec``'s optimizer over a stage of ``num_steps`` steps: the spec's own, else
    :func:`build_warmup_scheduler` ``name`` (``trainer.lr_scheduler``) with the spec's warmup ratio."""
    if spec.schedule is not None:
        return spec.schedule(optimizer, num_steps)
    return build_warmup_scheduler(optimizer, num_steps, float(spec.warmup_ratio), name, kwargs)


def build_warmup_scheduler(optimizer: torch.optim.Optimizer, num_steps: int, warmup_ratio: float,
                           name: str = "linear", kwargs: dict[str, Any] | None = None) -> Any:
    """transformers' schedule ``name`` (``get_scheduler``) over ``num_steps`` steps with
    ``int(warmup_ratio * num_steps)`` warmup steps; ``kwargs`` are its ``scheduler_specific_kwargs``.
    ``linear`` (the default): linear warmup, then linear decay to 0."""
    from transformers import get_linear_schedule_with_warmup, get_scheduler

    warmup = int(warmup_ratio * num_steps)
    if name == "linear" and not kwargs:
        return get_linear_schedule_with_warmup(optimizer, warmup, num_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_steps,
                         scheduler_specific_kwargs=dict(kwargs or {}))


def check_scheduler(name: str, kwargs: dict[str, Any] | None) -> str | None:
    """None if ``build_warmup_scheduler(name, kwargs)`` works (tried on a throw-away optimizer), else why not."""
    from transformers import SchedulerType

    names = [t.value for t in SchedulerType if t.value != "reduce_lr_on_plateau"]
    if name not in names:
        return f"must be one of {', '.join(names)} (got {name!r})"
    try:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        build_warmup_scheduler(opt, 10, 0.1, name, kwargs)
    except (TypeError, ValueError) as exc:
        return f"{name} does not take lr_scheduler_kwargs {dict(kwargs or {})}: {str(exc).splitlines()[0]}"
    return None
