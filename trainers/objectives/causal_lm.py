"""Causal-LM fine-tuning for tag generation (``dataset=english_quotes``, ``dataset.task: causal_lm``).

The data format is in :mod:`trainers.data.quotes`. Evaluation: ``eval_loss`` on the tag tokens,
``perplexity = exp(eval_loss)``, ``eval_accuracy`` (next-token accuracy on them), and greedy generation of
the tags of held-out quotes scored by ``tag_f1`` (mean over quotes of the set F1 of predicted vs true tags)
and ``tag_exact_match``; the generations are appended to ``samples.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from trainers.core.errors import UserError
from trainers.data.quotes import (
    IGNORE,
    CausalLMData,
    Quote,
    encode_example,
    pad_collator,
    parse_tags,
    prompt_ids,
    read_quotes,
    split_quotes,
    tag_f1,
)
from trainers.objectives.base import Batch, Collator, EvalContext, Objective, reduce_over_batches

log = logging.getLogger(__name__)
SAMPLES_FILE = "samples.jsonl"
EVAL_CHUNK = 16  # rows per forward pass in evaluation (full-vocabulary logits are large)


def shifted_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, correct argmax, count) over the next-token predictions whose label is not -100,
    as 0-d tensors on the logits' device."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    correct = ((logits.argmax(-1) == labels) & mask).sum().float()
    return loss, correct, mask.sum().float()


class CausalLMObjective(Objective):
    """Tag generation with a causal LM; see the module docstring for the data format and the metrics."""

    name = "causal_lm"

    def __init__(self, tokenizer: Any, dataset_cfg: Any) -> None:
        self.tokenizer = tokenizer
        self.cfg = dataset_cfg
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token; a causal-LM dataset needs one to end the tags")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.generation: list[Quote] = []

    def build_data(self, dataset_cfg: Any, data_root: str | None) -> CausalLMData:
        from trainers.data.readers import subset

        quotes = read_quotes(data_root)
        train, held_out = split_quotes(quotes, int(dataset_cfg.eval_size), int(dataset_cfg.split_seed))
        train = subset(train, dataset_cfg.max_train_samples)
        held_out = subset(held_out, dataset_cfg.max_eval_samples)
        length = int(dataset_cfg.max_seq_length)
        sep = str(dataset_cfg.separator)
        encoded_train = [encode_example(self.tokenizer, q, sep, length) for q in train]
        encoded_eval = [encode_example(self.tokenizer, q, sep, length) for q in held_out]
        encoded_eval.sort(key=lambda ex: len(ex["input_ids"]))  # less padding; the metrics do not depend on the order
        self.generation = held_out[: int(dataset_cfg.generate_samples)]
        return CausalLMData(encoded_train, encoded_eval, self.generation)

    def build_model(self, model_cfg: Any, spec: Any, data: Any) -> tuple[nn.Module, list[str]]:
        from trainers.models.loading import build_causal_lm

        return build_causal_lm(model_cfg, spec)

    def collator(self) -> Collator:
        return pad_collator(self.pad_id)

    def describe(self, data: Any) -> str:
        return f"{super().describe(data)} (tags of {len(data.generation)} generated per evaluation)"

    def batch_correct(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """Next-token accuracy on the tag tokens of this batch, times its number of examples."""
        with torch.no_grad():
            _, correct, count = shifted_token_stats(outputs.logits.detach(), batch["labels"])
        return correct / count.clamp(min=1.0) * batch["labels"].shape[0]

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, ctx: EvalContext, loader: Any) -> dict[str, float]:
        def sums(batch: Batch) -> torch.Tensor:
            total = torch.zeros(3, dtype=torch.float64, device=ctx.device)
            for start in range(0, batch["input_ids"].shape[0], EVAL_CHUNK):
                chunk = {k: v[start:start + EVAL_CHUNK] for k, v in batch.items()}
                labels = chunk.pop("labels")
                with ctx.accelerator.autocast():
                    logits = ctx.model(**chunk).logits
                total += torch.stack(shifted_token_stats(logits, labels)).double()
            return total

        totals = reduce_over_batches(ctx, loader, ("loss", "correct", "count"), sums)
        count = max(totals["count"], 1.0)
        loss = totals["loss"] / count
        metrics = {"eval_loss": loss, "eval_accuracy": totals["correct"] / count,
                   "perplexity": math.exp(min(loss, 50.0))}
        if self.generation:
            metrics.update(self.generate_and_score(ctx))
        return metrics

    def generate_and_score(self, ctx: EvalContext) -> dict[str, float]:
        """Greedy tags for this process's share of the generation quotes -> tag_f1 / tag_exact_match (all processes),
        the records appended to samples.jsonl and a few printed (main process)."""
        from accelerate.utils import gather_object
        from transformers import GenerationConfig

        mine = self.generation[ctx.rank::ctx.world_size]
        config = GenerationConfig(max_new_tokens=int(self.cfg.max_new_tokens), do_sample=False,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_id)
        length = int(self.cfg.max_seq_length)
        sep = str(self.cfg.separator)
        records = []
        batch_size = int(ctx.eval_batch_size)
        bar = tqdm(range(0, len(mine), batch_size), desc="generate", disable=None if ctx.is_main else True,
                   leave=False, dynamic_ncols=True)
        for start in bar:
            quotes = mine[start:start + batch_size]
            prompts = [prompt_ids(self.tokenizer, q, sep, length) for q in quotes]
            for chunk in range(0, len(prompts), EVAL_CHUNK):
                texts = self._generate(ctx, prompts[chunk:chunk + EVAL_CHUNK], config)
                for quote, text in zip(quotes[chunk:chunk + EVAL_CHUNK], texts, strict=True):
                    predicted = parse_tags(text)
                    true = [t.lower() for t in quote.tags]
                    records.append({"step": ctx.step, "quote": quote.quote, "tags": true,
                                    "generated": text, "predicted_tags": predicted,
                                    "tag_f1": tag_f1(predicted, true), "exact_match": set(predicted) == set(true)})
        if ctx.world_size > 1:
            records = gather_object(records)
        if ctx.is_main:
            self._save_samples(ctx, records)
        count = max(len(records), 1)
        return {"tag_f1": sum(r["tag_f1"] for r in records) / count,
                "tag_exact_match": sum(r["exact_match"] for r in records) / count}

    def _generate(self, ctx: EvalContext, prompts: list[list[int]], config: Any) -> list[str]:
        """Left-padded batched greedy decoding; the text generated after each prompt, up to EOS."""
        device = ctx.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with ctx.accelerator.autocast():
            out = ctx.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         generation_config=config)
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]

    def _save_samples(self, ctx: EvalContext, records: list[dict[str, Any]]) -> None:
        path = Path(ctx.run_dir) / SAMPLES_FILE
        with path.open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        for record in records[: int(self.cfg.show_samples)]:
            log.info("sample at step %d: %r -> %s (true: %s, F1 %.2f)", record["step"], record["quote"][:80],
                     ", ".join(record["predicted_tags"]) or "<none>", ", ".join(record["tags"]), record["tag_f1"])
