"""The weight-decomposition analysis of the DoRA paper (sec. 3, fig. 2): how far each adapted layer's weight
moved in magnitude and in direction from the pretrained one, per checkpoint.

For every adapted ``nn.Linear`` and recorded step t, with W_0 the pretrained weight and W_t the merged weight
(``adapters.weight_decomposition``; m = the row norms, as DoRA and PEFT define it):

    dM = mean over rows |m_t - m_0|          dD = mean over rows (1 - cos(W_t row, W_0 row))

Rows go to ``analysis/weight_decomposition.csv`` (method, step, layer, dM, dD); the scatter (dD on x, dM on y,
one colour per step) to ``analysis/weight_decomposition.png`` with the Pearson correlation of dM and dD over
all points of a method in the legend. The paper finds a negative correlation for full fine-tuning and DoRA,
a positive one for LoRA. A sweep gets one panel per method (``plot_sweep_decomposition``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainers.core.files import atomic_write_text
from trainers.core.plots import pyplot, save_figure
from trainers.loop.hooks import Trainer, TrainerCallback

ANALYSIS_DIR = "analysis"
CSV_NAME = "weight_decomposition.csv"
PNG_NAME = "weight_decomposition.png"
COLUMNS = ("method", "step", "layer", "dM", "dD")


def csv_path(run_dir: Path) -> Path:
    return Path(run_dir) / ANALYSIS_DIR / CSV_NAME


def write_rows(run_dir: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write the rows (sorted by step, then in model order) atomically to ``analysis/weight_decomposition.csv``."""
    path = csv_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: int(r["step"])):  # stable: layers stay in model order
        writer.writerow({**row, "dM": f"{float(row['dM']):.9g}", "dD": f"{float(row['dD']):.9g}"})
    atomic_write_text(path, text.getvalue())
    return path


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``analysis/weight_decomposition.csv`` (step int, dM and dD float); [] when there is none."""
    path = csv_path(run_dir)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return [{"method": r["method"], "step": int(r["step"]), "layer": r["layer"], "dM": float(r["dM"]),
                 "dD": float(r["dD"])} for r in csv.DictReader(fh)]


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's correlation coefficient; nan with fewer than 2 points or a constant coordinate."""
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def correlations(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """method -> Pearson correlation of dM and dD over all its rows (every layer and step)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return {m: pearson([r["dD"] for r in rows if r["method"] == m], [r["dM"] for r in rows if r["method"] == m])
            for m in methods}


def _fmt_corr(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.3f}"


def _scatter(ax: Any, rows: Sequence[dict[str, Any]], method: str, corr: float) -> None:
    plt = pyplot()
    steps = sorted({r["step"] for r in rows})
    cmap = plt.get_cmap("viridis")
    for i, step in enumerate(steps):
        points = [r for r in rows if r["step"] == step]
        ax.scatter([r["dD"] for r in points], [r["dM"] for r in points], s=14, alpha=0.8,
                   color=cmap(i / max(len(steps) - 1, 1)), label=f"step {step}")
    ax.set_xlabel("ΔD (mean 1 - cos to W₀ rows)")
    ax.set_ylabel("ΔM (mean |m - m₀|)")
    ax.ticklabel_format(axis="both", style="sci", scilimits=(-3, 4), useOffset=False)
    ax.grid(alpha=0.3)
    ax.set_title(method)
    ax.legend(fontsize=7, title=f"{method}: corr(ΔM, ΔD) = {_fmt_corr(corr)}", title_fontsize=8, loc="best")


def plot_decomposition(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """The scatter, one panel per method found in ``rows`` (None when there are no rows)."""
    if not rows:
        return None
    plt = pyplot()
    corr = correlations(rows)
    methods = list(corr)
    cols = min(len(methods), 3)
    nrows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    for ax, method in zip(axes.flat, methods, strict=False):
        _scatter(ax, [r for r in rows if r["method"] == method], method, corr[method])
    if title:
        fig.suptitle(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, Path(path), dpi=110)


def plot_run_decomposition(run_dir: Path) -> Path | None:
    """``analysis/weight_decomposition.png`` of one run from its CSV."""
    run_dir = Path(run_dir)
    return plot_decomposition(read_rows(run_dir), run_dir / ANALYSIS_DIR / PNG_NAME,
                              f"{run_dir.parent.name}/{run_dir.name}")


class WeightDecompositionAnalysis(TrainerCallback):
    """Records dM and dD of every adapted layer every ``every_steps`` steps (0: never) and at the end of training,
    into ``analysis/weight_decomposition.csv`` (rewritten atomically each time, main process), and draws the
    scatter at the end. A resumed run keeps the rows of the steps before its checkpoint."""

    def __init__(self, method: str, every_steps: int = 0) -> None:
        self.method = str(method)
        self.every_steps = int(every_steps)
        self.rows: list[dict[str, Any]] = []

    def on_train_begin(self, trainer: Trainer) -> None:
        step = trainer.state.global_step
        self.rows = [r for r in read_rows(trainer.run_dir) if r["step"] <= step] if step > 0 else []

    def _record(self, trainer: Trainer) -> None:
        from adapters import weight_decomposition

        step = trainer.state.global_step
        if any(r["step"] == step for r in self.rows):
            return
        self.rows += [{"method": self.method, "step": step, **row} for row in weight_decomposition(trainer.model)]
        if trainer.is_main:
            write_rows(trainer.run_dir, self.rows)

    def on_step_end(self, trainer: Trainer) -> None:
        if self.every_steps and trainer.state.global_step % self.every_steps == 0:
            self._record(trainer)

    def on_train_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._record(trainer)
        if trainer.is_main:
            plot_run_decomposition(trainer.run_dir)

    def on_run_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        """metrics.json gets ``dm_dd_corr``: the correlation of dM and dD over every recorded layer and step."""
        corr = correlations(self.rows).get(self.method, math.nan)
        result["dm_dd_corr"] = None if math.isnan(corr) else corr


def method_of(run_dir: Path) -> str | None:
    """The ``adapter.name`` of a run folder (from ``.hydra/config.yaml``), None when it has none."""
    import yaml

    path = Path(run_dir) / ".hydra" / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    return (cfg.get("adapter") or {}).get("name")


def plot_sweep_decomposition(sweep_dir: Path, run_dirs: Sequence[Path]) -> tuple[Path | None, dict[str, float]]:
    """``weight_decomposition.png`` in the sweep folder (one panel per method, every job's rows pooled by method)
    and the correlation per method."""
    rows = [row for run in run_dirs for row in read_rows(run)]
    if not rows:
        return None, {}
    path = plot_decomposition(rows, Path(sweep_dir) / PNG_NAME, f"sweep {Path(sweep_dir).name}")
    return path, correlations(rows)
