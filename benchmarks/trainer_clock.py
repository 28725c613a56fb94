"""A trainer callback that timestamps every optimizer step, so a benchmark can split the trainer's
wall time into the step itself (forward, backward, optimizer) and everything around it (data,
logging, checkpoints). Used by ``benchmarks/step_time.py`` through ``trainer.callbacks``:

    python main.py +trainer.callbacks.clock._target_=benchmarks.trainer_clock.StepClock \\
        +trainer.callbacks.clock.path=steps.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from trainers.loop.hooks import TrainerCallback


class StepClock(TrainerCallback):
    """Records ``time.perf_counter()`` at the start and end of every optimizer step; writes them to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.begin: list[float] = []
        self.end: list[float] = []
        self.steps: list[int] = []

    def on_step_begin(self, trainer: Any) -> None:
        self.begin.append(time.perf_counter())

    def on_step_end(self, trainer: Any) -> None:
        self.end.append(time.perf_counter())
        self.steps.append(int(trainer.state.global_step))

    def on_train_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.path.write_text(json.dumps({"begin": self.begin, "end": self.end, "steps": self.steps}))
