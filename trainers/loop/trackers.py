"""Experiment trackers through accelerate: the ``logger`` config group.

``logger.name`` picks the tracker that the run's ``Accelerator`` gets as ``log_with`` (the run folder is its
``project_dir``): ``tensorboard``, ``wandb`` and ``mlflow`` are accelerate's own trackers, ``csv`` is
:class:`CSVTracker` below, ``none`` (the default) builds no tracker at all. :class:`TrackerLog` sends every
record written to ``metrics.jsonl`` to the tracker as well, as ``<split>/<key>`` at the record's step;
accelerate does that on the main process only.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

from trainers.core.errors import UserError
from trainers.core.files import atomic_write_text
from trainers.loop.hooks import Trainer, TrainerCallback

# logger.name -> the package it needs (None: nothing beyond the project's dependencies)
TRACKER_PACKAGES: dict[str, str | None] = {"none": None, "csv": None, "tensorboard": "tensorboard",
                                           "wandb": "wandb", "mlflow": "mlflow"}
CSV_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.json"


def tracker_values(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of one ``metrics.jsonl`` record as ``{prefix}{split}/{key}`` (``step``, ``split``, text,
    booleans and non-finite values left out)."""
    split = record.get("split", "train")
    values = {}
    for key, value in record.items():
        if key in ("step", "split") or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            values[f"{prefix}{split}/{key}"] = value
    return values


def flat_hparams(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """A nested config as ``dotted.key -> value``; lists, dicts and null become JSON text (TensorBoard's
    hyperparameters take only numbers, booleans and strings)."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(node, bool | int | float | str):
            flat[prefix] = node
        else:
            flat[prefix] = json.dumps(node)

    walk("", config)
    return flat


def check_tracker(name: str) -> None:
    """UserError when ``logger.name`` is unknown or its package is not installed."""
    if name not in TRACKER_PACKAGES:
        raise UserError(f"logger={name} is not a tracker (choose from: {', '.join(TRACKER_PACKAGES)})")
    package = TRACKER_PACKAGES[name]
    if package is not None and importlib.util.find_spec(package) is None:
        raise UserError(f"logger={name} needs the {package} package: pip install {package} "
                        f"(or this project's [{name}] extra)")


def log_with(name: str) -> Any:
    """What the Accelerator gets as ``log_with`` for ``logger.name`` (None for ``none``)."""
    check_tracker(name)
    if name == "none":
        return None
    return CSVTracker() if name == "csv" else name


def _namespace(key: str) -> str:
    """``task_1/`` for ``task_1/train/loss`` (one trainer of a continual run), ``""`` for ``train/loss``."""
    return key.rsplit("/", 2)[0] + "/" if key.count("/") >= 2 else ""


class CSVTracker(GeneralTracker):
    """``<project_dir>/<project>/metrics.csv``: one row per logged step (``step`` then one column per key, empty
    where a row has no value) and ``hparams.json``; the file is rewritten atomically at every log.

    A resumed run drops the rows from its first logged step on (of the same key prefix, e.g. ``task_1/`` in a
    continual run), so the file ends as the uninterrupted run's.
    """

    name = "csv"
    requires_logging_directory = True

    def __init__(self) -> None:
        super().__init__()
        self.folder: Path | None = None
        self.rows: list[dict[str, Any]] = []
        self._fresh = True

    def configure(self, logging_dir: str | Path, project: str) -> None:
        """Where to write (set before ``Accelerator.init_trackers``)."""
        self.folder = Path(logging_dir) / project

    @property
    def tracker(self) -> Any:
        return self.rows

    def start(self) -> None:
        if self.folder is None:
            raise RuntimeError("CSVTracker.configure() was not called")
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / CSV_FILE
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as fh:
                self.rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        assert self.folder is not None
        atomic_write_text(self.folder / HPARAMS_FILE, json.dumps(values, indent=1, sort_keys=True) + "\n")

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        assert self.folder is not None
        if self._fresh:  # first record of this process: forget what an interrupted run logged from here on
            self._fresh = False
            spaces = {_namespace(k) for k in values}
            if step is not None:
                self.rows = [r for r in self.rows if int(float(r["step"])) < step
                             or not spaces & {_namespace(k) for k in r if k != "step"}]
        self.rows.append({"step": step, **values})
        columns: dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.folder / CSV_FILE, text.getvalue())


class TrackerLog(TrainerCallback):
    """Sends each ``metrics.jsonl`` record to the accelerator's trackers (``prefix`` before every key)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        values = tracker_values(record, self.prefix)
        if values:
            trainer.accelerator.log(values, step=int(record["step"]))
