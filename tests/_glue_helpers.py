"""A trainer callback for the GLUE tests: keeps the model's eval-set outputs at the end of training."""

from __future__ import annotations

import json
from typing import Any

import torch

from trainers.loop.hooks import TrainerCallback


class KeepEvalOutputs(TrainerCallback):
    """At ``on_train_end``: the logits of every eval example (one at a time, no batching) and the labels, plus
    the model's config; the last instance is ``KeepEvalOutputs.last``. ``save``: the main process also writes them
    to ``eval_outputs.json`` in the run folder (for runs in another process)."""

    last: KeepEvalOutputs | None = None

    def __init__(self, save: bool = False) -> None:
        self.save = save
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
        if self.save and trainer.is_main:
            (trainer.run_dir / "eval_outputs.json").write_text(json.dumps({"logits": self.logits,
                                                                           "labels": self.labels}))
