"""A trainer callback for the best-checkpoint tests: a scripted evaluation metric."""

from __future__ import annotations

from typing import Any

from trainers.loop.hooks import TrainerCallback


class ScriptedMetric(TrainerCallback):
    """Adds ``eval_scripted = values[step // period - 1]`` to every evaluation (``nan`` outside the list), so a
    test decides which evaluation is the best one."""

    def __init__(self, values: list[float], period: int) -> None:
        self.values = [float(v) for v in values]
        self.period = int(period)

    def eval_metrics(self, trainer: Any) -> dict[str, float]:
        index = trainer.state.global_step // self.period - 1
        return {"eval_scripted": self.values[index] if 0 <= index < len(self.values) else float("nan")}
