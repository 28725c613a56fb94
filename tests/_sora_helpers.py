"""Helpers for the SoRA schedule tests; ``ThresholdLog`` is loaded by `python main.py` as a trainer callback."""

from __future__ import annotations

import json
from typing import Any

from trainers.loop.hooks import TrainerCallback

THRESHOLDS_FILE = "thresholds.jsonl"


class ThresholdLog(TrainerCallback):
    """After every optimizer step, append the gate optimizer's state to ``<run_dir>/thresholds.jsonl``:
    step, stage index, sparse_lambda, lr, threshold_mode and the soft-threshold it applies at that lr."""

    def on_step_begin(self, trainer: Any) -> None:
        group = trainer.optimizers["gate"].param_groups[0]  # the lr the coming step's soft-threshold will use
        self._before = {"lr": group["lr"], "threshold": trainer.optimizers["gate"].threshold(group)}

    def on_step_end(self, trainer: Any) -> None:
        group = trainer.optimizers["gate"].param_groups[0]
        record = {"step": trainer.state.global_step, "stage": trainer.state.stage_index,
                  "stage_step": trainer.state.stage_step, "sparse_lambda": group["sparse_lambda"],
                  "threshold_mode": group["threshold_mode"], **self._before}
        with (trainer.run_dir / THRESHOLDS_FILE).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
