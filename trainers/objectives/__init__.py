"""Objectives layer: what a run trains for (classification, causal LM); ``dataset.task`` picks one."""

from __future__ import annotations

from typing import Any

from trainers.core.errors import UserError
from trainers.objectives.base import EvalContext, Objective

OBJECTIVES = ("classification", "causal_lm")


def build_objective(cfg: Any, tokenizer: Any) -> Objective:
    """The objective named by ``dataset.task`` (default classification)."""
    name = cfg.dataset.get("task", "classification")
    if name == "classification":
        from trainers.objectives.classification import ClassificationObjective

        return ClassificationObjective(tokenizer)
    if name == "causal_lm":
        from trainers.objectives.causal_lm import CausalLMObjective

        return CausalLMObjective(tokenizer, cfg.dataset)
    raise UserError(f"unknown dataset.task {name!r} (choose from: {', '.join(OBJECTIVES)})")


__all__ = ["OBJECTIVES", "EvalContext", "Objective", "build_objective"]
