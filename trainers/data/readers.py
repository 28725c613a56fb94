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


def read_json(path: Path, expected: str) -> Any:
    """``path`` parsed as JSON; UserError naming the file, the line and column, and ``expected``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); expected {expected}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); "
                        f"expected {expected}") from None


def read_table(path: Path, columns: tuple[str, ...], delimiter: str = ",",
               quoting: int = csv.QUOTE_MINIMAL) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` for every row of a CSV/TSV file with a header that has ``columns``.

    UserError naming the file (and the line) for text that is not UTF-8, a header without the columns, a row
    with fewer fields than the header, or a malformed line."""
    kind = "tab-separated" if delimiter == "\t" else "comma-separated"
    expected = f"{kind} columns {', '.join(columns)}"
    rows = []
    reader = None
    try:
        with Path(path).open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter, quoting=quoting)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise UserError(f"{path}: the header line {header} lacks {', '.join(missing)}; expected {expected}")
            for row in reader:
                if any(row.get(c) is None for c in columns):
                    raise UserError(f"{path}, line {reader.line_num}: fewer fields than the header; "
                                    f"expected {expected}")
                rows.append((reader.line_num, row))
    except UnicodeDecodeError as exc:
        line = f", line {reader.line_num + 1}" if reader is not None else ""
        raise UserError(f"{path}{line}: not UTF-8 text (byte {exc.start} of the read block); expected {expected}") \
            from None
    except csv.Error as exc:
        line = f", line {reader.line_num}" if reader is not None else ""
        raise UserError(f"{path}{line}: {exc}; expected {expected}") from None
    return rows


def _label(path: Path, line: int | str, value: str, index: dict[str, int], what: str) -> int:
    """The class index of ``value``; UserError naming the file and line if it is not one of the known labels."""
    if value in index:
        return index[value]
    known = list(index)
    shown = ", ".join(known[:5]) + (f", ... ({len(known)} in all)" if len(known) > 5 else "")
    raise UserError(f"{path}, {line}: unknown {what} {value!r} (expected one of {shown})")


def _read_sst2(folder: Path) -> RawSplits:
    files = [folder / "train.tsv", folder / "dev.tsv"]
    _need(files, "sst2")
    names = ["negative", "positive"]
    index = {str(i): i for i in range(len(names))}

    def read(path: Path) -> Rows:
        rows = read_table(path, ("sentence", "label"), "\t", csv.QUOTE_NONE)
        return [(row["sentence"], _label(path, f"line {n}", row["label"].strip(), index, "label"))
                for n, row in rows]

    return RawSplits(read(files[0]), read(files[1]), names)


def _read_banking77(folder: Path) -> RawSplits:
    files = [folder / "train.csv", folder / "test.csv", folder / "categories.json"]
    _need(files, "banking77")
    names = read_json(files[2], "a list of the 77 category names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{files[2]}: expected a list of the 77 category names")
    index = {name: i for i, name in enumerate(names)}

    def read(path: Path) -> Rows:
        return [(row["text"], _label(path, f"line {n}", row["category"], index, "category (not in categories.json)"))
                for n, row in read_table(path, ("text", "category"))]

    return RawSplits(read(files[0]), read(files[1]), list(names))


def _clinc_label_names(domains: dict[str, list[str]]) -> list[str]:
    return [intent for intents in domains.values() for intent in intents]


def _read_clinc150(folder: Path) -> RawSplits:
    files = [folder / "data_full.json", folder / "domains.json"]
    _need(files, "clinc150")
    data = read_json(files[0], 'an object with "train" and "val" lists of [text, intent] pairs')
    domains = read_json(files[1], "an object mapping each domain to its list of intents")
    if not isinstance(domains, dict) or not all(isinstance(v, list) for v in domains.values()):
        raise UserError(f"{files[1]}: expected an object mapping each domain to its list of intents")
    names = _clinc_label_names(domains)
    index = {name: i for i, name in enumerate(names)}

    def rows(split: str) -> Rows:
        items = data.get(split) if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise UserError(f"{files[0]}: no {split!r} list; expected an object with \"train\" and \"val\" lists of "
                            f"[text, intent] pairs")
        out = []
        for i, item in enumerate(items):
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise UserError(f"{files[0]}, {split}[{i}]: expected a [text, intent] pair (got {str(item)[:80]})")
            out.append((item[0], _label(files[0], f"{split}[{i}]", item[1], index, "intent (not in domains.json)")))
        return out

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
    count = getattr(tokenizer, "num_special_tokens_to_add", None)  # transformers tokenizers have it
    specials = int(count(pair=pair)) if callable(count) else 0
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
