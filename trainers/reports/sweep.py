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
                   # continual runs
                   "acc_final", "aaa", "forgetting", "bwt", "active_adapters", "total_adapters", "adapter_params")
# task metrics (GLUE and own data): a column only when some job reports it
TASK_METRICS = ("eval_score", "eval_matthews_correlation", "eval_f1", "eval_pearson", "eval_spearmanr",
                "eval_mismatched_accuracy", "best_step", "nonzero_adapter_params")


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
        row.update({k: metrics[k] for k in TASK_METRICS if k in metrics})
        row["status"] = metrics.get("status", "failed")
        row["error"] = metrics.get("error", "")
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``summary.csv``: job, overrides, one column per overridden key, metrics, status, error."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and not k.startswith("_"))
    tail = [c for c in (*SUMMARY_METRICS, *TASK_METRICS, "status", "error") if c in columns]
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


def render_columns(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: the header, a dashed rule, then the rows, each column padded to its widest cell."""
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the sweep: job, the overrides that vary between jobs, main metrics, status."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row.get("_swept", []) if k not in keys)
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
    metrics = ["eval_score", "eval_accuracy", "eval_loss", "gate_zero_ratio", "dm_dd_corr", "aaa", "forgetting", "bwt",
               "active_adapters", "adapter_params", "wall_time_s"]
    columns = ["job", *(varying or ["overrides"]), *[m for m in metrics if any(r.get(m) is not None for r in rows)],
               "status"]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    return render_columns(columns, cells)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, var ** 0.5


def task_table(rows: list[dict[str, Any]]) -> str | None:
    """A table of methods x tasks (the paper's Table 1 layout) when the sweep varies ``dataset``: each cell the
    mean ``eval_score`` x 100 over the completed jobs (seeds) with its sample standard deviation, an ``avg``
    column (the mean of the task means), the kept adapter parameters (``nonzero_adapter_params``, else
    ``adapter_params``; mean over jobs) and the jobs' summed wall time. None when there is nothing to tabulate."""
    done = [r for r in rows if r.get("status") == "completed" and r.get("eval_score") is not None and r.get("dataset")]
    tasks = list(dict.fromkeys(str(r["dataset"]) for r in done))
    if len(tasks) < 2:
        return None
    method_of = {id(r): str(r.get("adapter") or r.get("experiment") or "run") for r in done}
    methods = list(dict.fromkeys(method_of.values()))
    header = ["method", *tasks, "avg", "adapter params", "wall time"]
    lines = []
    for method in methods:
        mine = [r for r in done if method_of[id(r)] == method]
        cells, means = [], []
        for task in tasks:
            scores = [100.0 * float(r["eval_score"]) for r in mine if str(r["dataset"]) == task]
            if not scores:
                cells.append("-")
                continue
            mean, std = _mean_std(scores)
            means.append(mean)
            cells.append(f"{mean:.2f}" + (f" ±{std:.2f} (n={len(scores)})" if len(scores) > 1 else ""))
        avg = f"{sum(means) / len(means):.2f}" if len(means) == len(tasks) else "-"
        params = [r.get("nonzero_adapter_params") if r.get("nonzero_adapter_params") is not None
                  else r.get("adapter_params") for r in mine]
        params = [float(p) for p in params if p is not None]
        kept = f"{sum(params) / len(params):,.0f}" if params else "-"
        wall = sum(float(r.get("wall_time_s") or 0.0) for r in mine)
        lines.append([method, *cells, avg, kept, f"{wall / 60:.1f} min"])
    return render_columns(header, lines)


SEED_TABLE_METRICS = ("eval_score", "acc_final", "aaa", "forgetting", "bwt", "active_adapters", "adapter_params",
                      "gate_zero_ratio", "wall_time_s")


def seed_table(rows: list[dict[str, Any]]) -> str | None:
    """Mean ±std over seeds: one line per setting (the swept values other than ``seed``) when the sweep varies
    ``seed``, one column per reported metric of :data:`SEED_TABLE_METRICS` (sample standard deviation over the
    completed jobs, ``n`` their count). None when the sweep does not vary the seed."""
    done = [r for r in rows if r.get("status") == "completed"]
    if len({str(r.get("seed")) for r in done if "seed" in r.get("_swept", [])}) < 2:
        return None
    keys: list[str] = []
    for row in done:
        keys.extend(k for k in row.get("_swept", []) if k not in keys and k != "seed")
    varying = [k for k in keys if len({str(r.get(k)) for r in done}) > 1]
    settings: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in done:
        settings.setdefault(tuple(str(row.get(k)) for k in varying), []).append(row)
    metrics = [m for m in SEED_TABLE_METRICS if any(r.get(m) is not None for r in done)]
    header = [*(varying or ["setting"]), "n", *metrics]
    lines = []
    for setting, mine in settings.items():
        cells = []
        for metric in metrics:
            values = [float(r[metric]) for r in mine if r.get(metric) is not None]
            if not values:
                cells.append("-")
                continue
            mean, std = _mean_std(values)
            digits = 0 if metric in ("adapter_params", "wall_time_s") else 2 if metric == "active_adapters" else 4
            cells.append(f"{mean:.{digits}f} ±{std:.{digits}f}")
        lines.append([*(setting or ("all",)), str(len(mine)), *cells])
    return render_columns(header, lines)
