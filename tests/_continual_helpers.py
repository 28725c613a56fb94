"""Helpers for the continual tests; ``KillInTask`` is loaded by `python main.py` as a trainer callback."""

from __future__ import annotations

import os
import signal
from typing import Any

from trainers.loop.hooks import TrainerCallback


class KillInTask(TrainerCallback):
    """SIGKILL this process right after optimizer step ``step`` of task ``task`` (its Trainer's run folder is
    ``tasks/task_{task}``), or with ``step=-1`` when task ``task`` ends (after its final checkpoint, before the
    continual runner records the task)."""

    def __init__(self, task: int, step: int) -> None:
        self.task, self.step = int(task), int(step)

    def _mine(self, trainer: Any) -> bool:
        return trainer.run_dir.name == f"task_{self.task}"

    def on_step_end(self, trainer: Any) -> None:
        if self._mine(trainer) and trainer.state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, trainer: Any, metrics: dict) -> None:
        if self._mine(trainer) and self.step == -1:
            os.kill(os.getpid(), signal.SIGKILL)
