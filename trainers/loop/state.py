"""The trainer's counters, saved in every checkpoint (``trainer_state.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainerState:
    """Where a run is; everything a resume needs besides weights, optimizer states and RNG states."""

    global_step: int = 0      # optimizer steps done, over all stages
    stage_index: int = 0      # stage being trained (== number of stages when training is done)
    stage_step: int = 0       # optimizer steps done in the current stage
    epoch: int = 0            # data epoch (seeds the shuffle: seed + epoch)
    batch_in_epoch: int = 0   # micro-batches of this epoch already consumed by each process
    samples_seen: int = 0     # training examples processed, all processes
    train_time_s: float = 0.0
    wall_time_s: float = 0.0  # of the finished segments (a resumed run adds its own)
    last_eval_step: int = -1
    last_eval: dict[str, float] = field(default_factory=dict)
    running: dict[str, float] = field(default_factory=dict)  # sums since the last training log line
    metrics_lines: int = 0    # lines of metrics.jsonl written when the checkpoint was taken
    best_step: int = -1       # step of the best evaluation so far by trainer.metric_for_best (-1: none yet)
    best_metric: float | None = None
    best_eval: dict[str, float] = field(default_factory=dict)  # that evaluation's metrics
    evals_without_improvement: int = 0  # evaluations since the best one (early stopping)
    stopped_early: bool = False
    skipped_steps: int = 0    # optimizer steps dropped for a non-finite loss or gradient (on_nonfinite=skip_step)
