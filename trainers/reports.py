"""Run outputs: ``metrics.jsonl`` (one line per logged step / evaluation), ``metrics.json`` (final), and
the sweep summary (``summary.csv`` + a printed table)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_METRICS = ("eval_accuracy", "eval_loss", "gate_zero_ratio", "trainable_params",
                   "train_samples_per_second", "wall_time_s",
                   "acc_final", "aaa", "forgetting", "active_adapters", "total_adapters", "adapter_params")  # continual
RESULT_FILES = (METRICS_JSON, METRICS_JSONL, "checkpoints", "adapter", "tasks")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def has_results(run_dir: Path) -> bool:
    """True if ``run_dir`` holds anything a run writes (metrics, checkpoints, an exported adapter)."""
    run_dir = Path(run_dir)
    for name in RESULT_FILES:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            return True
    return False


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends JSON lines to ``metrics.jsonl`` and writes ``metrics.json``; a no-op on non-main processes."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl = self.run_dir / METRICS_JSONL
        self.num_lines = 0

    def _lines(self, path: Path) -> list[str]:
        if not path.is_file():
            return []
        return path.read_text(encoding="utf-8").splitlines(keepends=True)

    def restart(self, keep_lines: int = 0, source: Path | None = None) -> None:
        """Keep the first ``keep_lines`` lines (of ``source``'s jsonl, default this run's); drop the rest.

        A resumed run drops what was logged after its checkpoint, so the file ends up exactly as the
        uninterrupted run's.
        """
        lines = self._lines(Path(source) / METRICS_JSONL if source else self.jsonl)[:keep_lines]
        self.num_lines = len(lines)
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.jsonl, "".join(lines))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it must hold ``step``)."""
        assert "step" in record, "every metrics.jsonl line needs a step"
        self.num_lines += 1
        if self.enabled:
            with self.jsonl.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def write_final(self, metrics: dict[str, Any]) -> None:
        if self.enabled:
            write_metrics_json(self.run_dir, metrics)


def write_metrics_json(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Atomically write ``metrics.json``."""
    atomic_write_text(Path(run_dir) / METRICS_JSON,
                      json.dumps({k: _clean(v) for k, v in metrics.items()}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- sweeps
def _job_sort_key(path: Path) -> tuple[int, Any]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def _override_pairs(overrides: list[str]) -> dict[str, str]:
    pairs = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep:
            pairs[key.lstrip("+~")] = value
    return pairs


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder under ``sweep_dir`` (those with ``.hydra/overrides.yaml``), in job order.

    A job without a readable ``metrics.json`` (killed, crashed) counts as ``failed``.
    """
    rows = []
    jobs = sorted({p.parent.parent for p in Path(sweep_dir).glob("**/.hydra/overrides.yaml")}, key=_job_sort_key)
    for job in jobs:
        try:
            overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")) or []
        except (OSError, yaml.YAMLError):
            overrides = []
        try:
            metrics = json.loads((job / METRICS_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metrics = {"status": "failed", "error": "no metrics.json (the job died before finishing)"}
        pairs = _override_pairs([str(o) for o in overrides])
        row: dict[str, Any] = {"job": str(job.relative_to(sweep_dir)), "overrides": " ".join(map(str, overrides)),
                               "_swept": list(pairs)}
        row.update(pairs)
        row.update({k: metrics.get(k) for k in SUMMARY_METRICS})
        row["status"] = metrics.get("status", "failed")
        row["error"] = metrics.get("error", "")
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``summary.csv``: job, overrides, one column per overridden key, metrics, status, error."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and not k.startswith("_"))
    tail = [c for c in (*SUMMARY_METRICS, "status", "error") if c in columns]
    columns = [c for c in columns if c not in tail] + tail
    path = Path(sweep_dir) / SUMMARY_CSV
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    os.replace(tmp, path)
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the sweep: job, the overrides that vary between jobs, main metrics, status."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row.get("_swept", []) if k not in keys)
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
    metrics = ["eval_accuracy", "eval_loss", "gate_zero_ratio", "aaa", "forgetting", "active_adapters",
               "adapter_params", "wall_time_s"]
    columns = ["job", *(varying or ["overrides"]), *[m for m in metrics if any(r.get(m) is not None for r in rows)],
               "status"]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
