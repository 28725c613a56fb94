"""Classification datasets: local files under ``data_root`` (offline) or the Hugging Face Hub, tokenised once."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainers.core.errors import UserError, first_line

Rows = list[tuple[str, int]]
SUBSET_SEED = 0  # max_*_samples subsets are the same for every training seed


@dataclass
class RawSplits:
    """Text/label pairs of one dataset: ``train`` and ``eval`` rows, and the label names."""

    train: Rows
    eval: Rows
    label_names: list[str]


# --------------------------------------------------------------------------------------------- local files
def _need(paths: list[Path], name: str) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"missing data file(s) for dataset {name}: {', '.join(missing)} "
                        f"(check data_root / DATA_ROOT)")


def _read_sst2(folder: Path) -> RawSplits:
    files = [folder / "train.tsv", folder / "dev.tsv"]
    _need(files, "sst2")

    def read(path: Path) -> Rows:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            return [(row["sentence"], int(row["label"])) for row in reader]

    return RawSplits(read(files[0]), read(files[1]), ["negative", "positive"])


def _read_banking77(folder: Path) -> RawSplits:
    files = [folder / "train.csv", folder / "test.csv", folder / "categories.json"]
    _need(files, "banking77")
    names = json.loads(files[2].read_text(encoding="utf-8"))
    index = {name: i for i, name in enumerate(names)}

    def read(path: Path) -> Rows:
        with path.open(encoding="utf-8", newline="") as fh:
            return [(row["text"], index[row["category"]]) for row in csv.DictReader(fh)]

    return RawSplits(read(files[0]), read(files[1]), list(names))


def _clinc_label_names(domains: dict[str, list[str]]) -> list[str]:
    return [intent for intents in domains.values() for intent in intents]


def _read_clinc150(folder: Path) -> RawSplits:
    files = [folder / "data_full.json", folder / "domains.json"]
    _need(files, "clinc150")
    data = json.loads(files[0].read_text(encoding="utf-8"))
    names = _clinc_label_names(json.loads(files[1].read_text(encoding="utf-8")))
    index = {name: i for i, name in enumerate(names)}

    def rows(split: str) -> Rows:
        return [(text, index[intent]) for text, intent in data[split]]

    return RawSplits(rows("train"), rows("val"), names)


# --------------------------------------------------------------------------------------------- the Hub
def _hub_rows(split: Any, text: str, label: str, keep: Callable[[int], bool] = lambda _: True,
              remap: Callable[[int], int] = lambda i: i) -> Rows:
    return [(t, remap(y)) for t, y in zip(split[text], split[label], strict=True) if keep(y)]


def _hub_sst2() -> RawSplits:
    from datasets import load_dataset

    ds = load_dataset("nyu-mll/glue", "sst2")
    return RawSplits(_hub_rows(ds["train"], "sentence", "label"), _hub_rows(ds["validation"], "sentence", "label"),
                     ["negative", "positive"])


def _hub_banking77() -> RawSplits:
    from datasets import load_dataset

    ds = load_dataset("PolyAI/banking77")
    names = ds["train"].features["label"].names
    return RawSplits(_hub_rows(ds["train"], "text", "label"), _hub_rows(ds["test"], "text", "label"), names)


def _hub_clinc150() -> RawSplits:
    from datasets import load_dataset

    ds = load_dataset("clinc/clinc_oos", "plus")
    hub_names = ds["train"].features["intent"].names
    names = sorted(n for n in hub_names if n != "oos")
    index = {n: i for i, n in enumerate(names)}
    keep = lambda y: hub_names[y] != "oos"  # noqa: E731
    remap = lambda y: index[hub_names[y]]  # noqa: E731
    return RawSplits(_hub_rows(ds["train"], "text", "intent", keep, remap),
                     _hub_rows(ds["validation"], "text", "intent", keep, remap), names)


READERS: dict[str, tuple[Callable[[Path], RawSplits], Callable[[], RawSplits]]] = {
    "sst2": (_read_sst2, _hub_sst2),
    "banking77": (_read_banking77, _hub_banking77),
    "clinc150": (_read_clinc150, _hub_clinc150),
}


def read_local_or_hub(name: str, data_root: str | None, local: Callable[[Path], Any],
                      hub: Callable[[], Any] | None) -> Any:
    """``local(<data_root>/<name>)`` when data_root is set, else ``hub()``; UserErrors say what to set."""
    if data_root is not None:
        folder = Path(data_root).expanduser() / name
        if not folder.is_dir():
            raise UserError(f"missing data folder {folder} for dataset {name} (check data_root / DATA_ROOT)")
        return local(folder)
    if hub is None:
        raise UserError(f"dataset {name} is read from local files only: set data_root (or DATA_ROOT) to the folder "
                        f"holding {name}/")
    try:
        return hub()
    except Exception as exc:  # offline, no cache, renamed dataset...
        raise UserError(f"cannot load dataset {name}: data_root is not set and the Hugging Face Hub failed "
                        f"({first_line(exc, 150)}); set data_root=/path/to/data or the DATA_ROOT environment variable "
                        f"to the folder holding {name}/") from None


def load_raw(name: str, data_root: str | None) -> RawSplits:
    """Read a dataset from ``<data_root>/<name>/`` or, when data_root is null, from the Hub."""
    if name not in READERS:
        raise UserError(f"unknown dataset.name {name!r} (choose from: {', '.join(sorted(READERS))})")
    return read_local_or_hub(name, data_root, *READERS[name])


def subset(rows: Rows, limit: int | None) -> Rows:
    """A fixed random subset of ``limit`` rows (order kept), or all rows."""
    if limit is None or limit >= len(rows):
        return rows
    keep = sorted(random.Random(SUBSET_SEED).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


# --------------------------------------------------------------------------------------------- tokenised
@dataclass
class ClassificationData:
    """Tokenised train and eval examples (dicts of token id lists and ``labels``)."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def tokenize(rows: Rows, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Tokenise without padding (batches are padded dynamically by :func:`make_collator`).

    UserError if ``max_length`` leaves no room for text: it must be at least the tokenizer's special tokens
    plus one token per text (below that, transformers would not truncate at all)."""
    if not rows:
        return []
    pair = isinstance(rows[0][0], tuple | list)
    specials = tokenizer.num_special_tokens_to_add(pair=pair)
    minimum = specials + (2 if pair else 1)
    if max_length < minimum:
        raise UserError(f"dataset.max_seq_length={max_length} leaves no room for text: the tokenizer adds {specials} "
                        f"special token(s) per example{' (a sentence pair)' if pair else ''}; use at least {minimum}")
    encoded = tokenizer([text for text, _ in rows], truncation=True, max_length=max_length)
    keys = list(encoded.keys())
    return [{**{k: encoded[k][i] for k in keys}, "labels": label} for i, (_, label) in enumerate(rows)]


def build_classification_data(dataset_cfg: Any, data_root: str | None, tokenizer: Any) -> ClassificationData:
    """Load, cut (max_*_samples) and tokenise a classification dataset. Eval examples are sorted by length."""
    raw = load_raw(dataset_cfg.name, data_root)
    train = tokenize(subset(raw.train, dataset_cfg.max_train_samples), tokenizer, dataset_cfg.max_seq_length)
    evals = tokenize(subset(raw.eval, dataset_cfg.max_eval_samples), tokenizer, dataset_cfg.max_seq_length)
    evals.sort(key=lambda ex: len(ex["input_ids"]))  # less padding; metrics do not depend on the order
    if not train or not evals:
        raise UserError(f"dataset {dataset_cfg.name} has an empty train or eval split")
    return ClassificationData(train, evals, raw.label_names)


def make_collator(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Pad a list of tokenised examples to the longest one and return tensors."""

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features],
                              return_tensors="pt")
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return dict(batch)

    return collate
