"""A trainer callback for the GLUE tests: keeps the model's eval-set outputs at the end of training."""

from __future__ import annotations

from typing import Any

import torch

from trainers.loop.hooks import TrainerCallback


class KeepEvalOutputs(TrainerCallback):
    """At ``on_train_end``: the logits of every eval example (one at a time, no batching) and the labels, plus
    the model's config; the last instance is ``KeepEvalOutputs.last``."""

    last: KeepEvalOutputs | None = None

    def __init__(self) -> None:
        self.logits: list[list[float]] = []
        self.labels: list[Any] = []
        self.config: Any = None
        KeepEvalOutputs.last = self

    @torch.no_grad()
    def on_train_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        model = trainer.model
        model.eval()
        self.config = model.config
        for example in trainer.data.eval:
            batch = trainer.collate([example])
            labels = batch.pop("labels")
            self.logits.append(model(**batch).logits[0].double().tolist())
            self.labels.append(labels[0].item())
