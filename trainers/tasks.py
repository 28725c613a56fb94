"""What the trainer trains for: a task builds the data and model of a run, scores training batches and evaluates.

The trainer's loop is the same for every task; only these parts differ. ``dataset.task`` picks one:
``classification`` (sequence classifiers, the default) or ``causal_lm`` (see ``trainers/causal_lm.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from trainers.errors import UserError

if TYPE_CHECKING:
    from trainers.trainer import Trainer


class Task:
    """The interface: data, model, collator, a per-batch training score and the evaluation metrics."""

    name = "task"

    def build_data(self, dataset_cfg: Any, data_root: str | None) -> Any:
        """Tokenised ``train`` / ``eval`` examples (dicts of id lists and ``labels``)."""
        raise NotImplementedError

    def build_model(self, model_cfg: Any, adapter_cfg: Any, data: Any) -> tuple[nn.Module, list[str]]:
        """The model with the adapter injected, and the wrapped module names."""
        raise NotImplementedError

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Turns a list of examples into a padded batch of tensors."""
        raise NotImplementedError

    def describe(self, data: Any) -> str:
        """A few words on the data for the start-of-run log line."""
        return f"{len(data.train)} train / {len(data.eval)} eval examples"

    def batch_correct(self, outputs: Any, batch: dict[str, torch.Tensor]) -> float:
        """The training batch's contribution to the running ``accuracy`` (which is divided by the example count)."""
        raise NotImplementedError

    def evaluate(self, trainer: Trainer, loader: Any) -> dict[str, float]:
        """Metrics over ``loader`` (the model is already in eval mode, gradients off)."""
        raise NotImplementedError


class ClassificationTask(Task):
    """Sequence classification: accuracy = mean(argmax logits == label); eval_loss = mean cross-entropy."""

    name = "classification"

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def build_data(self, dataset_cfg: Any, data_root: str | None) -> Any:
        from trainers.data import build_classification_data

        return build_classification_data(dataset_cfg, data_root, self.tokenizer)

    def build_model(self, model_cfg: Any, adapter_cfg: Any, data: Any) -> tuple[nn.Module, list[str]]:
        from trainers.models import build_model

        return build_model(model_cfg, adapter_cfg, data.num_labels)

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        from trainers.data import make_collator

        return make_collator(self.tokenizer)

    def describe(self, data: Any) -> str:
        return f"{super().describe(data)}, {data.num_labels} labels"

    def batch_correct(self, outputs: Any, batch: dict[str, torch.Tensor]) -> float:
        return float((outputs.logits.argmax(-1) == batch["labels"]).sum())

    def evaluate(self, trainer: Trainer, loader: Any) -> dict[str, float]:
        """eval_loss and eval_accuracy over the evaluation set."""
        sums = torch.zeros(3, dtype=torch.float64)
        bar = tqdm(loader, desc="eval", disable=None if trainer.is_main else True, leave=False, dynamic_ncols=True)
        for batch in bar:
            batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with trainer.accelerator.autocast():
                logits = trainer.model(**batch).logits
            logits = logits.float()
            sums += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(),
                                  (logits.argmax(-1) == labels).sum().item(), labels.shape[0]], dtype=torch.float64)
            bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.4f}", acc=f"{sums[1].item() / sums[2].item():.3f}")
        if trainer.world_size > 1:
            sums = trainer.accelerator.reduce(sums.to(trainer.accelerator.device), reduction="sum").cpu()
        loss_sum, correct, count = sums.tolist()
        return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}


TASKS = ("classification", "causal_lm")


def build_task(cfg: Any, tokenizer: Any) -> Task:
    """The task named by ``dataset.task`` (default classification)."""
    name = cfg.dataset.get("task", "classification")
    if name == "classification":
        return ClassificationTask(tokenizer)
    if name == "causal_lm":
        from trainers.causal_lm import CausalLMTask

        return CausalLMTask(tokenizer, cfg.dataset)
    raise UserError(f"unknown dataset.task {name!r} (choose from: {', '.join(TASKS)})")
