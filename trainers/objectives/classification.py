"""Sequence (or image) classification: accuracy = mean(argmax logits == label); eval_loss = mean cross-entropy.

Regression datasets (STS-B: one output, float labels; transformers then trains with MSE) report eval_loss =
mean squared error. Every evaluation also reports the dataset's metric family
(:mod:`trainers.objectives.metrics`: Matthews correlation, F1, Pearson/Spearman) and ``eval_score``, its main
metric; extra evaluation sets (MNLI mismatched) are reported as ``eval_<name>_<metric>``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers.objectives.base import Batch, Collator, EvalContext, Objective, reduce_over_batches
from trainers.objectives.metrics import task_metrics


class ClassificationObjective(Objective):
    """Text classification by default; ``image_size``/``num_channels`` switch the collator to images."""

    name = "classification"

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self.image_collator: Collator | None = None
        self.regression = False
        self.metric = "accuracy"
        self.extra_evals: dict[str, list[dict[str, Any]]] = {}

    def build_data(self, dataset_cfg: Any, data_root: str | None) -> Any:
        from trainers.data.files import OWN_DATA
        from trainers.data.readers import build_classification_data, tokenize_splits

        if dataset_cfg.name in OWN_DATA:  # dataset=files / dataset=hub: columns and files from the config
            data = tokenize_splits(OWN_DATA[dataset_cfg.name](dataset_cfg), dataset_cfg, self.tokenizer)
        else:
            data = build_classification_data(dataset_cfg, data_root, self.tokenizer)
        self.use_data(data)
        return data

    def use_data(self, data: Any) -> None:
        """Take the task type, metric family and extra evaluation sets of ``data``."""
        self.regression = bool(getattr(data, "regression", False))
        self.metric = str(getattr(data, "metric", "accuracy"))
        self.extra_evals = dict(getattr(data, "extra_evals", {}) or {})

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
        if getattr(data, "regression", False):
            return f"{super().describe(data)}, regression"
        return f"{super().describe(data)}, {data.num_labels} labels"

    def batch_correct(self, outputs: Any, batch: Batch) -> torch.Tensor:
        if self.regression:  # no accuracy for a regression target: the training lines show 0
            return torch.zeros((), device=batch["labels"].device)
        return (outputs.logits.detach().argmax(-1) == batch["labels"]).sum()

    def evaluate(self, ctx: EvalContext, loader: Any) -> dict[str, float]:
        """eval_loss, eval_accuracy (classification), the dataset's metrics and eval_score over the evaluation
        set, then the same for each extra evaluation set."""
        metrics = self._evaluate_set(ctx, loader, "eval_")
        if self.extra_evals:
            from trainers.data.sampling import ShardSampler, make_loader

            for name, examples in self.extra_evals.items():
                extra = make_loader(examples, ShardSampler(len(examples), ctx.rank, ctx.world_size),
                                    ctx.eval_batch_size, self.collator(), 0, 0)
                metrics.update(self._evaluate_set(ctx, extra, f"eval_{name}_"))
        return metrics

    def _evaluate_set(self, ctx: EvalContext, loader: Any, prefix: str) -> dict[str, float]:
        need_predictions = self.regression or self.metric != "accuracy"
        preds: list[torch.Tensor] = []
        golds: list[torch.Tensor] = []

        def sums(batch: Batch) -> torch.Tensor:
            labels = batch.pop("labels")
            with ctx.accelerator.autocast():
                logits = ctx.model(**batch).logits
            logits = logits.float()
            if self.regression:
                predicted = logits.squeeze(-1)
                loss = F.mse_loss(predicted, labels.float(), reduction="sum")
                correct = torch.zeros((), device=labels.device)
            else:
                predicted = logits.argmax(-1)
                loss = F.cross_entropy(logits, labels, reduction="sum")
                correct = (predicted == labels).sum()
            if need_predictions:
                preds.append(predicted.detach())
                golds.append(labels.detach())
            return torch.stack([loss.double(), correct.double(),
                                torch.tensor(labels.shape[0], dtype=torch.float64, device=labels.device)])

        totals = reduce_over_batches(ctx, loader, ("loss", "correct", "count"), sums)
        count = max(totals["count"], 1.0)
        metrics = {f"{prefix}loss": totals["loss"] / count}
        if not self.regression:
            metrics[f"{prefix}accuracy"] = totals["correct"] / count
        if not need_predictions:
            metrics[f"{prefix}score"] = metrics[f"{prefix}accuracy"]
            return metrics
        predicted = torch.cat(preds).cpu().tolist() if preds else []
        gold = torch.cat(golds).cpu().tolist() if golds else []
        if ctx.world_size > 1:
            from accelerate.utils import gather_object

            pairs = gather_object(list(zip(predicted, gold, strict=True)))
            predicted, gold = [p for p, _ in pairs], [g for _, g in pairs]
        metrics.update(task_metrics(self.metric, predicted, gold, prefix))
        return metrics
