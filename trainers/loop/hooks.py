"""Training-loop hooks: the one way to add behaviour to the trainer without editing the loop.

Method plug-ins (``trainers.methods``) add their extra loss terms, per-step updates, evaluation metrics
and end-of-run steps here; users can add their own through ``trainer.callbacks`` in the config
(``name: {_target_: my.module.MyCallback, ...kwargs}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from trainers.loop.stages import Stage

# The trainer that calls the hooks (``trainers.loop.trainer.Trainer``; not imported here, the trainer imports this).
Trainer = Any


class TrainerCallback:
    """Base class: every hook is a no-op. ``trainer.state`` holds the step counters.

    Order inside one optimizer step: ``on_step_begin`` -> for each micro-batch: forward,
    ``extra_losses`` -> backward -> ``on_before_optimizer_step`` -> gradient clipping, optimizer and
    scheduler steps -> ``on_step_end`` -> logging
    (``log_values``, then ``on_log`` with the record), evaluation (``on_evaluate``) and checkpointing when due.
    """

    def on_train_begin(self, trainer: Trainer) -> None:
        """Once per process run, after a resume has been loaded."""

    def on_stage_begin(self, trainer: Trainer, stage: Stage) -> None:
        """When a stage starts (not again when a run resumes inside it)."""

    def on_step_begin(self, trainer: Trainer) -> None:
        """Before the first micro-batch of each optimizer step."""

    def extra_losses(self, trainer: Trainer, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named loss terms added to the model's loss for this micro-batch (logged separately)."""
        return {}

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        """Gradients are complete (all-reduced, unscaled) and not yet clipped; ``trainer.log_due`` says whether
        this step will be logged."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After the optimizer and scheduler steps; ``trainer.state.global_step`` is already advanced."""

    def log_values(self, trainer: Trainer) -> dict[str, float]:
        """Extra values for the training line of ``metrics.jsonl``."""
        return {}

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After each record (a training line or an evaluation) is written to ``metrics.jsonl``, on every
        process (only the main one writes the file); ``record`` is the line as logged (``step``, ``split``...)."""

    def eval_metrics(self, trainer: Trainer) -> dict[str, float]:
        """Extra metrics added to every evaluation (e.g. a sparsity measure of the adapter)."""
        return {}

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After each evaluation."""

    def on_stage_end(self, trainer: Trainer, stage: Stage, metrics: dict[str, float]) -> None:
        """After a stage's last step and its evaluation."""

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After the final evaluation and checkpoint."""

    def on_run_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        """Once per process after training, with the final metrics (``result``, written to metrics.json
        afterwards; a hook may add keys) and before the adapter is exported: end-of-run work such as
        pruning the adapter, which changes the model."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved in checkpoints (for callbacks that keep state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
