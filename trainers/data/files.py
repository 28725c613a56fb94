"""Your own data: ``dataset=files`` (CSV, TSV or JSON Lines) and ``dataset=hub`` (any Hugging Face dataset).

Both give :class:`trainers.data.readers.RawSplits`: rows ``(text, label)`` or ``((text, text_pair), label)``.
Classification labels are the distinct training labels, sorted (numerically when all are integers), and
an evaluation label that training never saw is an error; regression labels are floats.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from trainers.core.errors import UserError, first_line
from trainers.data.readers import RawSplits, Rows

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
PROBLEM_TYPES = ("classification", "regression")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV / TSV (header line, UTF-8, a BOM dropped) or JSON Lines file (one object per line), by
    extension; UserError for a missing, unreadable or empty file."""
    path = Path(path).expanduser()
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unknown file type {path.suffix!r} (use .csv, .tsv or .jsonl)")
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            if kind == "jsonl":
                records = []
                for number, line in enumerate(fh, start=1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError(f"line {number} is not a JSON object")
                        records.append(record)
            else:
                records = list(csv.DictReader(fh, delimiter="\t" if kind == "tsv" else ","))
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise UserError(f"cannot read {path}: {first_line(exc)}") from None
    if not records:
        raise UserError(f"data file {path} is empty (no rows)")
    return records


def _columns(records: list[Mapping[str, Any]], where: str, columns: Iterable[str | None]) -> None:
    present = list(records[0].keys())
    for column in columns:
        if column is not None and column not in present:
            raise UserError(f"{where} has no column {column!r} (columns: {', '.join(map(str, present))})")


def _texts(records: list[Mapping[str, Any]], text: str, pair: str | None) -> list[Any]:
    if pair is None:
        return [str(r[text]) for r in records]
    return [(str(r[text]), str(r[pair])) for r in records]


def _label_order(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=lambda v: int(v))
    except ValueError:
        return sorted(values)


def _label_key(value: Any) -> str:
    """A label as text (JSON 1 and CSV "1" are the same class)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def build_splits(train: list[Mapping[str, Any]], evals: list[Mapping[str, Any]], text: str, pair: str | None,
                 label: str, problem_type: str, metric: str | None, names: tuple[str, str]) -> RawSplits:
    """Rows of ``train``/``evals`` records (dicts), checked: every column present, labels numeric for regression,
    every eval label seen in training for classification. ``names`` says where each split came from."""
    if problem_type not in PROBLEM_TYPES:
        raise UserError(f"dataset.problem_type must be classification or regression (got {problem_type!r})")
    for records, where in ((train, names[0]), (evals, names[1])):
        _columns(records, where, (text, pair, label))
    if problem_type == "regression":
        def numbers(records: list[Mapping[str, Any]], where: str) -> list[float]:
            out = []
            for i, r in enumerate(records, start=1):
                try:
                    out.append(float(r[label]))
                except (TypeError, ValueError):
                    raise UserError(f"{where} row {i}: label {r[label]!r} is not a number (problem_type "
                                    f"regression)") from None
            return out

        rows = [list(zip(_texts(recs, text, pair), numbers(recs, where), strict=True))
                for recs, where in ((train, names[0]), (evals, names[1]))]
        return RawSplits(rows[0], rows[1], [], True, metric or "pearson")
    label_names = _label_order({_label_key(r[label]) for r in train})
    index = {name: i for i, name in enumerate(label_names)}
    unseen = sorted({_label_key(r[label]) for r in evals} - set(index))
    if unseen:
        raise UserError(f"{names[1]}: label(s) {', '.join(map(repr, unseen[:5]))} do not occur in {names[0]} "
                        f"(training labels: {', '.join(label_names[:10])}{'...' if len(label_names) > 10 else ''})")
    if len(label_names) < 2:
        raise UserError(f"{names[0]}: only one label ({label_names[0]!r}); classification needs at least two")
    splits: list[Rows] = [list(zip(_texts(recs, text, pair), [index[_label_key(r[label])] for r in recs],
                                   strict=True)) for recs in (train, evals)]
    return RawSplits(splits[0], splits[1], label_names, False, metric or "accuracy")


def read_files(cfg: Any) -> RawSplits:
    """``dataset=files``: ``train_file`` and ``eval_file`` with the configured columns."""
    if not cfg.get("train_file") or not cfg.get("eval_file"):
        raise UserError("dataset=files needs dataset.train_file and dataset.eval_file (CSV, TSV or JSON Lines)")
    return build_splits(read_records(cfg.train_file), read_records(cfg.eval_file), str(cfg.text_column),
                        cfg.get("text_pair_column"), str(cfg.label_column), str(cfg.problem_type), cfg.get("metric"),
                        (str(cfg.train_file), str(cfg.eval_file)))


def read_hub(cfg: Any) -> RawSplits:
    """``dataset=hub``: ``datasets.load_dataset(path, name)`` (a Hub id or a local dataset folder), the
    ``train_split`` / ``eval_split`` splits and the configured columns. A ClassLabel column keeps its names."""
    try:
        from datasets import load_dataset

        ds = load_dataset(str(cfg.path), cfg.get("config_name"))
    except Exception as exc:
        raise UserError(f"cannot load dataset.path={cfg.path!r} (config {cfg.get('config_name')!r}): "
                        f"{first_line(exc, 200)}") from None
    splits = []
    for key in ("train_split", "eval_split"):
        split = str(cfg[key])
        if split not in ds:
            raise UserError(f"dataset {cfg.path} has no split {split!r} (splits: {', '.join(ds.keys())})")
        splits.append(ds[split])
    label = str(cfg.label_column)
    feature = splits[0].features.get(label)
    names = getattr(feature, "names", None)
    records = []
    for split in splits:
        part = split.to_list()
        if names is not None and cfg.problem_type == "classification":  # ClassLabel ids -> their names
            part = [{**r, label: names[r[label]] if r[label] is not None and r[label] >= 0 else r[label]}
                    for r in part]
        if not part:
            raise UserError(f"dataset {cfg.path}: split {split.split} is empty")
        records.append(part)
    raw = build_splits(records[0], records[1], str(cfg.text_column), cfg.get("text_pair_column"), label,
                       str(cfg.problem_type), cfg.get("metric"),
                       (f"{cfg.path}[{cfg.train_split}]", f"{cfg.path}[{cfg.eval_split}]"))
    if names is not None and not raw.regression:  # keep the dataset's own label order
        order = {name: i for i, name in enumerate(names)}
        if set(raw.label_names) <= set(order):
            remap = {i: order[name] for i, name in enumerate(raw.label_names)}
            raw = RawSplits([(t, remap[y]) for t, y in raw.train], [(t, remap[y]) for t, y in raw.eval],
                            list(names), False, raw.metric)
    return raw


OWN_DATA = {"files": read_files, "hub": read_hub}  # dataset.name -> reader of the whole dataset config
