"""``curves.png``: a run's training curves from its ``metrics.jsonl``, and a sweep's runs drawn over each other.

Panels (each only when the run logged it): training loss, the evaluation metric (``eval_accuracy``, else the
first ``eval_*`` metric, else ``eval_loss``), the learning rates (``lr`` and every ``*_lr``, e.g. a gate
optimizer's), the gate zero ratio (gated adapters), and the gradient norms (``grad_norm`` and the per-component
``grad_norm_<component>``, log scale). The x axis is the optimizer step, sorted; a step logged twice (a
resumed run) keeps its last line.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainers.core.plots import pyplot, save_figure
from trainers.loop.metrics_log import METRICS_JSONL

log = logging.getLogger(__name__)
CURVES_PNG = "curves.png"
Series = dict[str, list[tuple[int, float]]]  # key -> sorted (step, value)


def read_series(run_dir: Path) -> dict[str, Series]:
    """``{"train": {key: [(step, value), ...]}, "eval": {...}}`` from ``metrics.jsonl`` (numbers only, sorted by
    step, the last line of a step wins). Missing or unreadable lines are skipped."""
    by_split: dict[str, dict[str, dict[int, float]]] = {"train": {}, "eval": {}}
    path = Path(run_dir) / METRICS_JSONL
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        split = by_split.get(record.get("split"))
        step = record.get("step")
        if split is None or not isinstance(step, int):
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value):
                split.setdefault(key, {})[step] = float(value)
    return {split: {k: sorted(v.items()) for k, v in keys.items()} for split, keys in by_split.items()}


def eval_metric(series: dict[str, Series]) -> str | None:
    """The evaluation metric a run is judged by: eval_accuracy, else the first other eval_* key, else eval_loss."""
    keys = [k for k in series["eval"] if k.startswith("eval_")]
    if "eval_accuracy" in keys:
        return "eval_accuracy"
    others = [k for k in keys if k != "eval_loss"]
    return others[0] if others else ("eval_loss" if keys else None)


# A panel: title, y label, log scale, and a function picking (label, points) pairs from a run's series.
Panel = tuple[str, str, bool, Callable[[dict[str, Series]], list[tuple[str, list[tuple[int, float]]]]]]


def _pick(split: str, keys: Callable[[Series], list[str]]) -> Callable[[dict[str, Series]], list]:
    return lambda s: [(k, s[split][k]) for k in keys(s[split])]


PANELS: list[Panel] = [
    ("training loss", "loss", False, _pick("train", lambda s: [k for k in ("loss",) if k in s])),
    ("evaluation", "metric", False, lambda s: [(m, s["eval"][m]) for m in [eval_metric(s)] if m]),
    ("learning rates", "learning rate", False,
     _pick("train", lambda s: [k for k in s if k == "lr" or k.endswith("_lr")])),
    ("gate zero ratio", "fraction of gates = 0", False,
     lambda s: [(f"{split} {k}", s[split][k]) for split in ("eval", "train") for k in s[split]
                if k == "gate_zero_ratio"][:1]),
    ("gradient norms (before clipping)", "L2 norm", True,
     _pick("train", lambda s: [k for k in s if k == "grad_norm" or k.startswith("grad_norm_")])),
]


def _draw(panels: list[tuple[Panel, list[tuple[str, list[tuple[int, float]]]]]], title: str, path: Path) -> Path:
    plt = pyplot()
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, ((name, ylabel, log, _), lines) in zip(axes.flat, panels, strict=False):
        for label, points, *style in lines:
            if log:  # a log axis shows positive values only (e.g. dL/dA is exactly 0 while B is still 0)
                points = [(x, y) for x, y in points if y > 0] or points
            xs, ys = zip(*points, strict=True)
            marker = "o" if len(xs) < 30 else None
            ax.plot(xs, ys, marker=marker, markersize=3, label=label, **(style[0] if style else {}))
        if log and any(y > 0 for _, pts, *_ in lines for _, y in pts):
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return save_figure(fig, path, dpi=110)


def run_panels(series: dict[str, Series]) -> list[tuple[Panel, list[tuple[str, list[tuple[int, float]]]]]]:
    """The panels one run has data for, each with its (label, points) lines."""
    return [(panel, lines) for panel in PANELS if (lines := [(k, p) for k, p in panel[3](series) if p])]


def plot_run_curves(run_dir: Path, path: Path | None = None) -> Path | None:
    """Draw ``curves.png`` for one run folder (None when metrics.jsonl holds nothing to draw)."""
    run_dir = Path(run_dir)
    panels = run_panels(read_series(run_dir))
    if not panels:
        return None
    return _draw(panels, f"{run_dir.parent.name}/{run_dir.name}", path or run_dir / CURVES_PNG)


def draw_run_curves(run_dir: Path) -> Path | None:
    """:func:`plot_run_curves`, logged; a plotting failure is a warning, never a failed run (the results are
    already written when the curves are drawn)."""
    try:
        path = plot_run_curves(run_dir)
    except Exception as exc:  # a picture must not cost the results
        log.warning("curves.png not drawn in %s: %s", run_dir, exc)
        return None
    if path is not None:
        log.info("training curves: %s", path)
    return path


def fmt_value(value: Any) -> str:
    """A readable label value: floats to 4 significant digits (no 17-digit reprs), numeric strings alike."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return value if len(value) <= 8 else f"{number:.4g}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def job_label(row: dict[str, Any], varying: Sequence[str]) -> str:
    """``key=value ...`` of the overrides that differ between the sweep's jobs (the job folder if none)."""
    parts = [f"{k.rsplit('.', 1)[-1]}={fmt_value(row.get(k))}" for k in varying]
    return " ".join(parts) or str(row.get("job"))


# a sweep's curves: one colour per job, one line style per series of a job
LINESTYLES = ("-", "--", ":", "-.", (0, (3, 1, 1, 1, 1, 1)))


def plot_sweep_curves(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path | None:
    """``curves.png`` in the sweep folder: every job's curves over each other, one colour per job (one line style
    per series when a panel draws several of a job, e.g. the gradient norms), labelled by the overrides that vary.
    ``rows``: ``trainers.reports.sweep.collect_sweep``'s. None when nothing to draw."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row.get("_swept", []) if k not in keys)
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
    runs = [(job_label(r, varying), read_series(Path(sweep_dir) / r["job"])) for r in rows]
    panels = []
    for panel in PANELS:
        lines = [(f"{label}: {key}" if len(picked) > 1 else label, points,
                  {"color": f"C{job % 10}", "linestyle": LINESTYLES[index % len(LINESTYLES)]})
                 for job, (label, series) in enumerate(runs) for picked in [panel[3](series)]
                 for index, (key, points) in enumerate(picked) if points]
        if lines:
            panels.append((panel, lines))
    if not panels:
        return None
    return _draw(panels, f"sweep {Path(sweep_dir).name} ({len(rows)} jobs)", Path(sweep_dir) / CURVES_PNG)
