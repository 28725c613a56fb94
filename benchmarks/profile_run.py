"""Where a real training step's time goes: torch.profiler over a window of optimizer steps of ``main.py``.

    python main.py dataset.max_train_samples=3200 trainer.save_every_steps=0 \\
        '+trainer.callbacks.profile={_target_: benchmarks.profile_run.ProfileSteps, start: 20, steps: 40}'

:class:`ProfileSteps` is an ordinary ``trainer.callbacks`` entry: it starts ``torch.profiler.profile`` (CPU
activity, plus CUDA where available) at optimizer step ``start`` and stops it ``steps`` steps later, then
writes ``profile.txt`` into the run folder (the operators by self time, ``row_limit`` rows) and logs its
path. The whole step is inside the window: forward, backward, clipping, optimizer, scheduler, data loading.
It changes no training result: the profiler only observes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from trainers.loop.hooks import TrainerCallback

log = logging.getLogger(__name__)


class ProfileSteps(TrainerCallback):
    """Profile optimizer steps ``start + 1`` .. ``start + steps`` and write ``<run dir>/profile.txt``."""

    def __init__(self, start: int = 20, steps: int = 40, row_limit: int = 25) -> None:
        self.start, self.steps, self.row_limit = int(start), int(steps), int(row_limit)
        self._profiler: Any = None
        self._done = False

    def on_step_end(self, trainer: Any) -> None:
        step = trainer.state.global_step
        if self._profiler is None and not self._done and step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
        elif self._profiler is not None and step >= self.start + self.steps:
            self._finish(trainer)

    def on_train_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self._profiler is not None:  # the run ended inside the window
            self._finish(trainer)

    def _finish(self, trainer: Any) -> None:
        self._profiler.__exit__(None, None, None)
        steps = trainer.state.global_step - self.start
        table = self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.row_limit)
        self._profiler, self._done = None, True
        path = Path(trainer.run_dir) / "profile.txt"
        path.write_text(f"torch.profiler over optimizer steps {self.start + 1}..{self.start + steps} "
                        f"({steps} steps), sorted by self CPU time\n{table}\n", encoding="utf-8")
        log.info("profile of %d steps: %s", steps, path)
