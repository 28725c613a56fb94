"""Causal-LM fine-tuning for tag generation (``dataset=english_quotes``, ``dataset.task: causal_lm``).

Each quote becomes ``"<quote><separator> <tag>, <tag>, ...<eos>"`` (separator `` | tags:``). The labels are
-100 up to and including the separator, so the loss (mean next-token cross-entropy) covers only the tag tokens
and the EOS that ends them. Evaluation: ``eval_loss`` on those tokens, ``perplexity = exp(eval_loss)``,
``eval_accuracy`` (next-token accuracy on them), and greedy generation of the tags of held-out quotes scored by
``tag_f1`` (mean over quotes of the set F1 of predicted vs true tags) and ``tag_exact_match``; the generations
are appended to ``samples.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from trainers.errors import UserError, first_line
from trainers.tasks import Task

if TYPE_CHECKING:
    from trainers.trainer import Trainer

log = logging.getLogger(__name__)
IGNORE = -100  # label of the tokens that carry no loss (prompt, separator, padding)
SAMPLES_FILE = "samples.jsonl"
EVAL_CHUNK = 16  # rows per forward pass in evaluation (full-vocabulary logits are large)


# --------------------------------------------------------------------------------------------- data
@dataclass
class Quote:
    quote: str
    tags: list[str]


def read_quotes(data_root: str | None) -> list[Quote]:
    """``<data_root>/english_quotes/quotes.jsonl`` (records with quote, author, tags); quotes without tags dropped."""
    if data_root is None:
        try:
            from datasets import load_dataset

            rows = load_dataset("Abirate/english_quotes")["train"]
            return [Quote(r["quote"].strip("“”"), list(r["tags"])) for r in rows if r["tags"]]
        except Exception as exc:
            raise UserError("cannot load dataset english_quotes: data_root is not set and the Hugging Face Hub failed "
                            f"({first_line(exc, 150)}); set data_root=/path/to/data or the DATA_ROOT environment "
                            "variable to the folder holding english_quotes/") from None
    path = Path(data_root).expanduser() / "english_quotes" / "quotes.jsonl"
    if not path.is_file():
        raise UserError(f"missing data file(s) for dataset english_quotes: {path} (check data_root / DATA_ROOT)")
    quotes = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                quote, tags = str(record["quote"]).strip(), [str(t).strip() for t in record["tags"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{path}:{number}: not a quote record ({exc})") from None
            if quote and any(tags):
                quotes.append(Quote(quote, [t for t in tags if t]))
    return quotes


def split_quotes(quotes: list[Quote], eval_size: int, seed: int) -> tuple[list[Quote], list[Quote]]:
    """A seeded shuffle, then the first ``eval_size`` quotes are held out for evaluation."""
    if not 0 < eval_size < len(quotes):
        raise UserError(f"dataset.eval_size must be in [1, {len(quotes) - 1}] (got {eval_size})")
    order = list(range(len(quotes)))
    random.Random(seed).shuffle(order)
    return [quotes[i] for i in order[eval_size:]], [quotes[i] for i in order[:eval_size]]


def format_tags(tags: Iterable[str]) -> str:
    """The target text after the separator: `` a, b, c``."""
    return " " + ", ".join(tags)


def parse_tags(text: str) -> list[str]:
    """Generated text after the separator -> tags (comma-separated, stripped, empty ones and repeats dropped)."""
    seen: dict[str, None] = {}
    for part in text.split(","):
        tag = part.strip().lower()
        if tag:
            seen[tag] = None
    return list(seen)


def tag_f1(predicted: Iterable[str], true: Iterable[str]) -> float:
    """Set F1: 2 |P ∩ T| / (|P| + |T|) (= 2 precision recall / (precision + recall)); 1.0 when both are empty."""
    p, t = {x.lower() for x in predicted}, {x.lower() for x in true}
    if not p and not t:
        return 1.0
    return 2 * len(p & t) / (len(p) + len(t))


def encode_example(tokenizer: Any, quote: Quote, separator: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of ``quote + separator + tags + eos`` with labels -100 on the prompt (quote and separator).

    Too long: the quote is cut first (from its end), then the tags; the separator and EOS always stay.
    """
    quote_ids = tokenizer(quote.quote, add_special_tokens=False)["input_ids"]
    sep_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(format_tags(quote.tags), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    room = max_length - len(sep_ids) - 1  # for quote + tags
    if room < 2:
        raise UserError(f"dataset.max_seq_length={max_length} leaves no room for a quote and its tags")
    keep_target = min(len(target_ids), max(room - len(quote_ids), room // 2))
    quote_ids = quote_ids[: room - keep_target]
    prompt = quote_ids + sep_ids
    target = target_ids[:keep_target] + [eos]
    ids = prompt + target
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * len(prompt) + target}


def prompt_ids(tokenizer: Any, quote: Quote, separator: str, max_length: int) -> list[int]:
    """The generation prompt (quote + separator), the quote cut to fit ``max_length`` tokens."""
    sep_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    quote_ids = tokenizer(quote.quote, add_special_tokens=False)["input_ids"]
    return quote_ids[: max(max_length - len(sep_ids), 1)] + sep_ids


@dataclass
class CausalLMData:
    """Tokenised train/eval examples and the held-out quotes whose tags are generated at each evaluation."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    generation: list[Quote]


def pad_collator(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Right-pad to the longest example: input_ids with ``pad_id``, attention_mask with 0, labels with -100."""

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": torch.full((len(features), width), pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
               "labels": torch.full((len(features), width), IGNORE, dtype=torch.long)}
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            for key in out:
                out[key][i, :n] = torch.tensor(f[key], dtype=torch.long)
        return out

    return collate


# --------------------------------------------------------------------------------------------- metrics
def shifted_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """(summed cross-entropy, correct argmax, count) over the next-token predictions whose label is not -100."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    correct = ((logits.argmax(-1) == labels) & mask).sum()
    return loss.item(), float(correct), float(mask.sum())


class CausalLMTask(Task):
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
        from trainers.data import subset

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

    def build_model(self, model_cfg: Any, adapter_cfg: Any, data: Any) -> tuple[nn.Module, list[str]]:
        from trainers.models import build_causal_lm

        return build_causal_lm(model_cfg, adapter_cfg)

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return pad_collator(self.pad_id)

    def describe(self, data: Any) -> str:
        return f"{super().describe(data)} (tags of {len(data.generation)} generated per evaluation)"

    def batch_correct(self, outputs: Any, batch: dict[str, torch.Tensor]) -> float:
        """Next-token accuracy on the tag tokens of this batch, times its number of examples."""
        with torch.no_grad():
            _, correct, count = shifted_token_stats(outputs.logits.detach(), batch["labels"])
        return correct / max(count, 1.0) * batch["labels"].shape[0]

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: Trainer, loader: Any) -> dict[str, float]:
        device = trainer.accelerator.device
        sums = torch.zeros(3, dtype=torch.float64)
        bar = tqdm(loader, desc="eval", disable=None if trainer.is_main else True, leave=False, dynamic_ncols=True)
        for batch in bar:
            for start in range(0, batch["input_ids"].shape[0], EVAL_CHUNK):
                chunk = {k: v[start:start + EVAL_CHUNK].to(device) for k, v in batch.items()}
                labels = chunk.pop("labels")
                with trainer.accelerator.autocast():
                    logits = trainer.model(**chunk).logits
                sums += torch.tensor(shifted_token_stats(logits, labels), dtype=torch.float64)
        if trainer.world_size > 1:
            sums = trainer.accelerator.reduce(sums.to(device), reduction="sum").cpu()
        loss_sum, correct, count = sums.tolist()
        loss = loss_sum / max(count, 1.0)
        metrics = {"eval_loss": loss, "eval_accuracy": correct / max(count, 1.0),
                   "perplexity": math.exp(min(loss, 50.0))}
        if self.generation:
            metrics.update(self.generate_and_score(trainer))
        return metrics

    def generate_and_score(self, trainer: Trainer) -> dict[str, float]:
        """Greedy tags for this process's share of the generation quotes -> tag_f1 / tag_exact_match (all processes),
        the records appended to samples.jsonl and a few printed (main process)."""
        from accelerate.utils import gather_object
        from transformers import GenerationConfig

        mine = self.generation[trainer.rank::trainer.world_size]
        config = GenerationConfig(max_new_tokens=int(self.cfg.max_new_tokens), do_sample=False,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_id)
        length = int(self.cfg.max_seq_length)
        sep = str(self.cfg.separator)
        records = []
        batch_size = int(trainer.tcfg.eval_batch_size)
        bar = tqdm(range(0, len(mine), batch_size), desc="generate", disable=None if trainer.is_main else True,
                   leave=False, dynamic_ncols=True)
        for start in bar:
            quotes = mine[start:start + batch_size]
            prompts = [prompt_ids(self.tokenizer, q, sep, length) for q in quotes]
            for chunk in range(0, len(prompts), EVAL_CHUNK):
                texts = self._generate(trainer, prompts[chunk:chunk + EVAL_CHUNK], config)
                for quote, text in zip(quotes[chunk:chunk + EVAL_CHUNK], texts, strict=True):
                    predicted = parse_tags(text)
                    true = [t.lower() for t in quote.tags]
                    records.append({"step": trainer.state.global_step, "quote": quote.quote, "tags": true,
                                    "generated": text, "predicted_tags": predicted,
                                    "tag_f1": tag_f1(predicted, true), "exact_match": set(predicted) == set(true)})
        if trainer.world_size > 1:
            records = gather_object(records)
        if trainer.is_main:
            self._save_samples(trainer, records)
        count = max(len(records), 1)
        return {"tag_f1": sum(r["tag_f1"] for r in records) / count,
                "tag_exact_match": sum(r["exact_match"] for r in records) / count}

    def _generate(self, trainer: Trainer, prompts: list[list[int]], config: Any) -> list[str]:
        """Left-padded batched greedy decoding; the text generated after each prompt, up to EOS."""
        device = trainer.accelerator.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with trainer.accelerator.autocast():
            out = trainer.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         generation_config=config)
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]

    def _save_samples(self, trainer: Trainer, records: list[dict[str, Any]]) -> None:
        path = Path(trainer.run_dir) / SAMPLES_FILE
        with path.open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        for record in records[: int(self.cfg.show_samples)]:
            log.info("sample at step %d: %r -> %s (true: %s, F1 %.2f)", record["step"], record["quote"][:80],
                     ", ".join(record["predicted_tags"]) or "<none>", ", ".join(record["tags"]), record["tag_f1"])
