"""The sweep summary: ``summary.csv`` in the sweep folder (one row per job) and a printed table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from trainers.core.files import atomic_write_text
from trainers.loop.metrics_log import METRICS_JSON

SUMMARY_CSV = "summary.csv"
SUMMARY_METRICS = ("eval_accuracy", "eval_loss", "gate_zero_ratio", "dm_dd_corr", "trainable_params",
                   "train_samples_per_second", "wall_time_s",
                   "acc_final", "aaa", "forgetting", "active_adapters", "total_adapters", "adapter_params")  # continual


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
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    atomic_write_text(path, text.getvalue())
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
    metrics = ["eval_accuracy", "eval_loss", "gate_zero_ratio", "dm_dd_corr", "aaa", "forgetting", "active_adapters",
               "adapter_params", "wall_time_s"]
    columns = ["job", *(varying or ["overrides"]), *[m for m in metrics if any(r.get(m) is not None for r in rows)],
               "status"]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
