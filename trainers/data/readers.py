"""Classification datasets: local files under ``data_root`` (offline) or the Hugging Face Hub, tokenised once.

A row is ``(text, label)``: ``text`` is one string, or a ``(sentence1, sentence2)`` tuple for sentence-pair
tasks (encoded as a pair by the tokenizer); ``label`` is a class index, or a float for regression (STS-B).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainers.core.errors import UserError, first_line

Text = str | tuple[str, str]
Rows = list[tuple[Text, Any]]
SUBSET_SEED = 0  # max_*_samples subsets are the same for every training seed


@dataclass
class RawSplits:
    """Text/label rows of one dataset: ``train`` and ``eval`` rows, and the label names.

    ``regression``: labels are floats and the model has one output (MSE loss). ``metric`` names the metric family
    the objective reports (``accuracy``, ``matthews``, ``f1``, ``pearson``; see
    :mod:`trainers.objectives.metrics`). ``extra_evals``: further evaluation sets reported under their name
    (MNLI's mismatched dev set).
    """

    train: Rows
    eval: Rows
    label_names: list[str]
    regression: bool = False
    metric: str = "accuracy"
    extra_evals: dict[str, Rows] = field(default_factory=dict)


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


# --------------------------------------------------------------------------------------------- GLUE
@dataclass(frozen=True)
class GlueTask:
    """Where one GLUE task's fields are: local TSV columns (names, or indices for CoLA, which has no header),
    the Hub config (``nyu-mll/glue``) and its columns, labels, and the task's metric family."""

    name: str
    text: str | int
    pair: str | int | None
    label: str | int
    label_names: tuple[str, ...]  # label strings of the local files, in class-index order (empty: regression)
    metric: str
    hub_text: str
    hub_pair: str | None
    eval_files: tuple[str, ...] = ("dev.tsv",)
    eval_splits: tuple[str, ...] = ("validation",)
    header: bool = True

    @property
    def regression(self) -> bool:
        return not self.label_names


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", 3, None, 1, ("0", "1"), "matthews", "sentence", None, header=False),
    GlueTask("mrpc", "#1 String", "#2 String", "Quality", ("0", "1"), "f1", "sentence1", "sentence2"),
    GlueTask("rte", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), "accuracy",
             "sentence1", "sentence2"),
    GlueTask("stsb", "sentence1", "sentence2", "score", (), "pearson", "sentence1", "sentence2"),
    GlueTask("qnli", "question", "sentence", "label", ("entailment", "not_entailment"), "accuracy",
             "question", "sentence"),
    GlueTask("mnli", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"), "accuracy",
             "premise", "hypothesis", eval_files=("dev_matched.tsv", "dev_mismatched.tsv"),
             eval_splits=("validation_matched", "validation_mismatched")),
    GlueTask("qqp", "question1", "question2", "is_duplicate", ("0", "1"), "f1_accuracy", "question1", "question2"),
)}
GLUE_HUB_ONLY = ("qnli", "mnli", "qqp")  # not in the offline folder: read from the Hub when data_root lacks them


def _tsv_records(path: Path, header: bool) -> tuple[list[str] | None, list[list[str]]]:
    """(header or None, rows) of a GLUE TSV: every field a string, no quoting, a UTF-8 BOM dropped (MRPC)."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not header:
        return None, rows
    if not rows:
        raise UserError(f"{path} is empty")
    return rows[0], rows[1:]


def _glue_label(task: GlueTask, value: str, where: str) -> Any:
    if task.regression:
        try:
            return float(value)
        except ValueError:
            raise UserError(f"{where}: score {value!r} is not a number") from None
    try:
        return task.label_names.index(value)
    except ValueError:
        raise UserError(f"{where}: label {value!r} is not one of {', '.join(task.label_names)}") from None


def read_glue_tsv(task: GlueTask, path: Path) -> Rows:
    """The rows of one GLUE task file: ``(sentence, label)`` or ``((sentence1, sentence2), label)``."""
    head, records = _tsv_records(path, task.header)

    def column(key: str | int) -> int:
        if isinstance(key, int):
            return key
        if head is None or key not in head:
            raise UserError(f"{path} has no column {key!r} (columns: {', '.join(head or [])})")
        return head.index(key)

    text, label = column(task.text), column(task.label)
    pair = column(task.pair) if task.pair is not None else None
    width = max(text, label, pair if pair is not None else 0)
    rows: Rows = []
    for line, record in enumerate(records, start=2 if task.header else 1):
        if len(record) <= width:
            raise UserError(f"{path} line {line} has {len(record)} fields, expected at least {width + 1}")
        sentence = record[text] if pair is None else (record[text], record[pair])
        rows.append((sentence, _glue_label(task, record[label], f"{path} line {line}")))
    return rows


def _glue_local(task: GlueTask) -> Callable[[Path], RawSplits]:
    def read(folder: Path) -> RawSplits:
        files = [folder / "train.tsv", *(folder / f for f in task.eval_files)]
        _need(files, task.name)
        evals = [read_glue_tsv(task, f) for f in files[1:]]
        extra = {Path(f).stem.replace("dev_", ""): rows for f, rows in zip(task.eval_files[1:], evals[1:],
                                                                               strict=True)}
        return RawSplits(read_glue_tsv(task, files[0]), evals[0], list(task.label_names), task.regression,
                         task.metric, extra)

    return read


def _glue_hub(task: GlueTask) -> Callable[[], RawSplits]:
    def read() -> RawSplits:
        from datasets import load_dataset

        ds = load_dataset("nyu-mll/glue", task.name)

        def rows(split: str) -> Rows:
            part = ds[split]
            texts = part[task.hub_text] if task.hub_pair is None else list(zip(part[task.hub_text],
                                                                               part[task.hub_pair], strict=True))
            labels = [float(y) for y in part["label"]] if task.regression else [int(y) for y in part["label"]]
            return list(zip(texts, labels, strict=True))

        extra = {s.replace("validation_", ""): rows(s) for s in task.eval_splits[1:]}
        return RawSplits(rows("train"), rows(task.eval_splits[0]), list(task.label_names), task.regression,
                         task.metric, extra)

    return read


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
FOLDERS = {name: f"glue/{name}" for name in GLUE_TASKS}  # dataset name -> folder under data_root (default: name)
READERS.update({name: (_glue_local(task), _glue_hub(task)) for name, task in GLUE_TASKS.items()})


def read_local_or_hub(name: str, data_root: str | None, local: Callable[[Path], Any],
                      hub: Callable[[], Any] | None, folder_name: str | None = None,
                      hub_if_missing: bool = False) -> Any:
    """``local(<data_root>/<folder_name or name>)`` when data_root is set, else ``hub()``; UserErrors say what to
    set. ``hub_if_missing``: a data_root without that folder falls back to the Hub too."""
    if data_root is not None:
        folder = Path(data_root).expanduser() / (folder_name or name)
        if folder.is_dir():
            return local(folder)
        if not hub_if_missing or hub is None:
            raise UserError(f"missing data folder {folder} for dataset {name} (check data_root / DATA_ROOT)")
        try:
            return hub()
        except Exception as exc:
            raise UserError(f"cannot load dataset {name}: {folder} does not exist and the Hugging Face Hub failed "
                            f"({first_line(exc, 150)}); put the GLUE files there or allow Hub access") from None
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
    return read_local_or_hub(name, data_root, *READERS[name], folder_name=FOLDERS.get(name),
                             hub_if_missing=name in GLUE_HUB_ONLY)


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
    regression: bool = False
    metric: str = "accuracy"
    extra_evals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        """Model outputs: one for regression, else the number of classes."""
        return 1 if self.regression else len(self.label_names)


def tokenize(rows: Rows, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Tokenise without padding (batches are padded dynamically by :func:`make_collator`). Pair rows
    (``((a, b), label)``) are encoded as pairs (``[CLS] a [SEP] b [SEP]`` with token type ids for BERT),
    truncating the longer sentence first."""
    if not rows:
        return []
    pairs = [text for text, _ in rows if not isinstance(text, str)]
    if pairs and len(pairs) != len(rows):
        raise UserError("a dataset mixes single sentences and sentence pairs")
    if pairs:
        encoded = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=max_length)
    else:
        encoded = tokenizer([text for text, _ in rows], truncation=True, max_length=max_length)
    keys = list(encoded.keys())
    return [{**{k: encoded[k][i] for k in keys}, "labels": label} for i, (_, label) in enumerate(rows)]


def build_classification_data(dataset_cfg: Any, data_root: str | None, tokenizer: Any) -> ClassificationData:
    """Load, cut (max_*_samples) and tokenise a classification dataset. Eval examples are sorted by length."""
    raw = load_raw(dataset_cfg.name, data_root)
    return tokenize_splits(raw, dataset_cfg, tokenizer)


def tokenize_splits(raw: RawSplits, dataset_cfg: Any, tokenizer: Any) -> ClassificationData:
    """Cut (max_*_samples) and tokenise ``raw``. Eval examples are sorted by length."""
    length = dataset_cfg.max_seq_length

    def eval_set(rows: Rows) -> list[dict[str, Any]]:
        examples = tokenize(subset(rows, dataset_cfg.max_eval_samples), tokenizer, length)
        examples.sort(key=lambda ex: len(ex["input_ids"]))  # less padding; metrics do not depend on the order
        return examples

    train = tokenize(subset(raw.train, dataset_cfg.max_train_samples), tokenizer, length)
    evals = eval_set(raw.eval)
    if not train or not evals:
        raise UserError(f"dataset {dataset_cfg.name} has an empty train or eval split")
    return ClassificationData(train, evals, raw.label_names, raw.regression, raw.metric,
                              {name: eval_set(rows) for name, rows in raw.extra_evals.items()})


def make_collator(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Pad a list of tokenised examples to the longest one and return tensors (float labels: regression)."""

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features],
                              return_tensors="pt")
        regression = isinstance(features[0]["labels"], float)
        batch["labels"] = torch.tensor([f["labels"] for f in features],
                                       dtype=torch.float32 if regression else torch.long)
        return dict(batch)

    return collate
