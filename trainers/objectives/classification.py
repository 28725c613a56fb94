"""Sequence (or image) classification: accuracy = mean(argmax logits == label); eval_loss = mean cross-entropy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers.objectives.base import Batch, Collator, EvalContext, Objective, reduce_over_batches


class ClassificationObjective(Objective):
    """Text classification by default; ``image_size``/``num_channels`` switch the collator to images."""

    name = "classification"

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self.image_collator: Collator | None = None

    def build_data(self, dataset_cfg: Any, data_root: str | None) -> Any:
        from trainers.data.readers import build_classification_data

        return build_classification_data(dataset_cfg, data_root, self.tokenizer)

    def build_model(self, model_cfg: Any, spec: Any, data: Any) -> tuple[nn.Module, list[str]]:
        from trainers.models.loading import build_model

        model, wrapped = build_model(model_cfg, spec, data.num_labels)
        if model_cfg.get("modality", "text") == "image":
            from trainers.data.continual import make_image_collator

            self.image_collator = make_image_collator(int(model.config.image_size), int(model.config.num_channels))
        return model, wrapped

    def collator(self) -> Collator:
        if self.image_collator is not None:
            return self.image_collator
        from trainers.data.readers import make_collator

        return make_collator(self.tokenizer)

    def describe(self, data: Any) -> str:
        return f"{super().describe(data)}, {data.num_labels} labels"

    def batch_correct(self, outputs: Any, batch: Batch) -> torch.Tensor:
        return (outputs.logits.detach().argmax(-1) == batch["labels"]).sum()

    def evaluate(self, ctx: EvalContext, loader: Any) -> dict[str, float]:
        """eval_loss and eval_accuracy over the evaluation set."""

        def sums(batch: Batch) -> torch.Tensor:
            labels = batch.pop("labels")
            with ctx.accelerator.autocast():
                logits = ctx.model(**batch).logits
            logits = logits.float()
            return torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                (logits.argmax(-1) == labels).sum().double(),
                                torch.tensor(labels.shape[0], dtype=torch.float64, device=labels.device)])

        totals = reduce_over_batches(ctx, loader, ("loss", "correct", "count"), sums)
        count = max(totals["count"], 1.0)
        return {"eval_loss": totals["loss"] / count, "eval_accuracy": totals["correct"] / count}
