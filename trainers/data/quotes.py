"""english_quotes for causal-LM tag generation: each quote becomes ``"<quote><separator> <tag>, <tag>, ...<eos>"``.

The labels are -100 (:data:`IGNORE`) up to and including the separator, so the loss covers only the tag
tokens and the EOS that ends them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainers.core.errors import UserError, first_line

IGNORE = -100  # label of the tokens that carry no loss (prompt, separator, padding)


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


