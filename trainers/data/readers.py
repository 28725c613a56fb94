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
    truncating the longer sentence first.

    UserError if ``max_length`` leaves no room for text: it must be at least the tokenizer's special tokens
    plus one token per text (below that, transformers would not truncate at all)."""
    if not rows:
        return []
    pairs = [text for text, _ in rows if not isinstance(text, str)]
    if pairs and len(pairs) != len(rows):
        raise UserError("a dataset mixes single sentences and sentence pairs")
    pair = bool(pairs)
    count = getattr(tokenizer, "num_special_tokens_to_add", None)  # transformers tokenizers have it
    specials = int(count(pair=pair)) if callable(count) else 0
    minimum = specials + (2 if pair else 1)
    if max_length < minimum:
        raise UserError(f"dataset.max_seq_length={max_length} leaves no room for text: the tokenizer adds {specials} "
                        f"special token(s) per example{' (a sentence pair)' if pair else ''}; use at least {minimum}")
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
