"""What a run trains for: an objective builds the data and model, scores training batches and evaluates.

The loop is the same for every objective; only these parts differ. Evaluation receives an
:class:`EvalContext` (model, accelerator, run folder, step), never the trainer itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

Batch = dict[str, torch.Tensor]
Collator = Callable[[list[dict[str, Any]]], Batch]


@dataclass
class EvalContext:
    """What an evaluation may use: the model (already in eval mode, gradients off), the accelerator, the run
    folder (for files such as generated samples), the optimizer step and the evaluation batch size."""

    model: nn.Module
    accelerator: Any
    run_dir: Path
    step: int
    eval_batch_size: int

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def reduce_over_batches(ctx: EvalContext, loader: Any, names: Sequence[str],
                        batch_sums: Callable[[Batch], torch.Tensor], desc: str = "eval") -> dict[str, float]:
    """Sum ``batch_sums(batch)`` (a vector of ``len(names)`` numbers per batch, batch already on the device) over
    ``loader`` and over all processes; returns name -> total. The sums stay on the device until the end (one
    host copy per evaluation), accumulated in float64."""
    totals = torch.zeros(len(names), dtype=torch.float64, device=ctx.device)
    for batch in tqdm(loader, desc=desc, disable=None if ctx.is_main else True, leave=False, dynamic_ncols=True):
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
        totals += batch_sums(batch).to(torch.float64)
    if ctx.world_size > 1:
        totals = ctx.accelerator.reduce(totals, reduction="sum")
    return dict(zip(names, totals.tolist(), strict=True))


class Objective:
    """The interface: data, model, collator, a per-batch training score and the evaluation metrics."""

    name = "objective"

    def build_data(self, dataset_cfg: Any, data_root: str | None) -> Any:
        """Tokenised ``train`` / ``eval`` examples (dicts of id lists and ``labels``)."""
        raise NotImplementedError

    def build_model(self, model_cfg: Any, spec: Any, data: Any) -> tuple[nn.Module, list[str]]:
        """The model with the adapter of ``spec`` (a :class:`trainers.models.loading.AdapterSpec`) injected, and
        the wrapped module names."""
        raise NotImplementedError

    def collator(self) -> Collator:
        """Turns a list of examples into a padded batch of tensors."""
        raise NotImplementedError

    def describe(self, data: Any) -> str:
        """A few words on the data for the start-of-run log line."""
        return f"{len(data.train)} train / {len(data.eval)} eval examples"

    def batch_correct(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """The training batch's contribution to the running ``accuracy`` (divided by the example count later),
        as a 0-d tensor on the batch's device (no host sync)."""
        raise NotImplementedError

    def evaluate(self, ctx: EvalContext, loader: Any) -> dict[str, float]:
        """Metrics over ``loader``."""
        raise NotImplementedError
