"""Gradient norms per component of the trainable parameters, logged as ``grad_norm_<component>``.

The components are named by the caller (the method plug-in and the experiment say which parameter names
belong to which), as regular expressions searched in the parameter's full name; the first that matches
wins, and trainable parameters no pattern matches form ``other``. The norms are the L2 norm of the
concatenated gradients of the component, before clipping, computed on the device at logged steps only
(``trainer.log_due``) and read when the training line is written.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from trainers.loop.hooks import Trainer, TrainerCallback

OTHER = "other"


def classify_parameters(named: list[tuple[str, torch.Tensor]], patterns: dict[str, str]) -> dict[str, list[Any]]:
    """component -> the parameters whose name matches its pattern first (``other``: none); empty ones left out."""
    compiled = [(component, re.compile(pattern)) for component, pattern in patterns.items()]
    groups: dict[str, list[Any]] = {}
    for name, param in named:
        component = next((c for c, rx in compiled if rx.search(name)), OTHER)
        groups.setdefault(component, []).append(param)
    return groups


def component_grad_norms(groups: dict[str, list[torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """The names and a device tensor of ||g||_2 per component (0 where no gradient exists yet)."""
    names, norms = [], []
    for component, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        names.append(component)
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                     if grads else torch.zeros((), device=params[0].device))
    return names, torch.stack(norms) if norms else torch.zeros(0)


class GradNormsByComponent(TrainerCallback):
    """Logs ``grad_norm_<component>`` at every logged step; ``patterns``: component -> regex on parameter names."""

    def __init__(self, patterns: dict[str, str]) -> None:
        self.patterns = dict(patterns)
        self._groups: dict[str, list[Any]] | None = None
        self._last: tuple[list[str], torch.Tensor] | None = None

    def _components(self, trainer: Trainer) -> dict[str, list[Any]]:
        if self._groups is None:
            named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
            self._groups = classify_parameters(named, self.patterns)
        return self._groups

    def on_train_begin(self, trainer: Trainer) -> None:
        self._groups = None  # a new trainer (e.g. the next task of a continual run) may train other parameters

    def on_stage_begin(self, trainer: Trainer, stage: Any) -> None:
        self._groups = None

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        if trainer.log_due:
            self._last = component_grad_norms(self._components(trainer))

    def log_values(self, trainer: Trainer) -> dict[str, float]:
        if self._last is None:
            return {}
        names, norms = self._last
        self._last = None
        return {f"grad_norm_{name}": value for name, value in zip(names, norms.tolist(), strict=True)}
