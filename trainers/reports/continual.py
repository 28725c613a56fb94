"""Continual-learning metrics as the field reports them, and their pictures.

``acc_matrix[i][j]`` is the accuracy on task j's classes after training task i (j <= i; a joint run
has one row covering every task). With ``counts[j]`` the number of evaluation examples of task j:

    A_i        = sum_{j<=i} counts_j acc[i][j] / sum_{j<=i} counts_j   accuracy on all classes seen after task i
    Acc        = A_{T-1}                                               final accuracy
    AAA        = (1 / T) sum_i A_i                                     average incremental accuracy
    forgetting = mean_{j < T-1} ( max_{j <= i <= T-1} acc[i][j] - acc[T-1][j] )   (SD-LoRA / PyCIL: the max
                 runs over every row that has task j, the last one included, so it is never negative)
    BWT        = mean_{j < T-1} ( acc[T-1][j] - acc[j][j] )                      backward transfer (Lopez-Paz &
                 Ranzato 2017): negative when learning later tasks hurt task j, positive when it helped

(counts None: every task weighs the same). Forgetting and BWT are 0 with a single row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainers.core.plots import pyplot, save_figure

Matrix = list[list[float]]


def seen_accuracy(row: list[float], counts: list[int] | None = None) -> float:
    """Accuracy over all classes in ``row``'s tasks, weighted by their evaluation sizes."""
    weights = [1.0] * len(row) if counts is None else [float(c) for c in counts[: len(row)]]
    return sum(a * w for a, w in zip(row, weights, strict=True)) / sum(weights)


def incremental_accuracies(acc_matrix: Matrix, counts: list[int] | None = None) -> list[float]:
    """A_i for every row."""
    return [seen_accuracy(row, counts) for row in acc_matrix]


def final_accuracy(acc_matrix: Matrix, counts: list[int] | None = None) -> float:
    """Acc = A_{T-1}."""
    return seen_accuracy(acc_matrix[-1], counts)


def average_incremental_accuracy(acc_matrix: Matrix, counts: list[int] | None = None) -> float:
    """AAA = mean_i A_i."""
    accs = incremental_accuracies(acc_matrix, counts)
    return sum(accs) / len(accs)


def _earlier_tasks(acc_matrix: Matrix) -> list[int]:
    """Tasks j < T-1 that have a row of their own (j < len(acc_matrix[j])): those forgetting and BWT average over."""
    last = len(acc_matrix) - 1
    return [j for j in range(min(last, len(acc_matrix[last]))) if j < len(acc_matrix[j])]


def forgetting(acc_matrix: Matrix) -> float:
    """Mean over the tasks before the last of (best accuracy over every row, the last included - final accuracy);
    never negative (SD-LoRA's definition)."""
    last = len(acc_matrix) - 1
    drops = [max(acc_matrix[i][j] for i in range(j, last + 1) if j < len(acc_matrix[i])) - acc_matrix[last][j]
             for j in _earlier_tasks(acc_matrix)]
    return sum(drops) / len(drops) if drops else 0.0


def backward_transfer(acc_matrix: Matrix) -> float:
    """BWT = mean over the tasks before the last of (final accuracy - accuracy right after learning the task)."""
    last = len(acc_matrix) - 1
    gains = [acc_matrix[last][j] - acc_matrix[j][j] for j in _earlier_tasks(acc_matrix)]
    return sum(gains) / len(gains) if gains else 0.0


def summarize(acc_matrix: Matrix, counts: list[int] | None = None) -> dict[str, Any]:
    """The metrics.json entries derived from the accuracy matrix."""
    return {"acc_matrix": acc_matrix, "acc_per_step": incremental_accuracies(acc_matrix, counts),
            "acc_final": final_accuracy(acc_matrix, counts),
            "aaa": average_incremental_accuracy(acc_matrix, counts), "forgetting": forgetting(acc_matrix),
            "bwt": backward_transfer(acc_matrix)}


# --------------------------------------------------------------------------------------------- pictures
def _finish(fig: Any, ax: Any, path: Path) -> Path:
    """Grid, legend, save to ``path`` and close the figure."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def plot_accuracy(acc_matrix: Matrix, counts: list[int] | None, path: Path, title: str = "") -> Path:
    """Accuracy on all seen classes after each task (bold) and on each task's own classes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
    steps = list(range(len(acc_matrix)))
    ax.plot(steps, [100 * a for a in incremental_accuracies(acc_matrix, counts)], "k-o", lw=2, label="all seen")
    for j in range(len(acc_matrix[-1])):
        xs = [i for i in steps if j < len(acc_matrix[i])]
        ax.plot(xs, [100 * acc_matrix[i][j] for i in xs], lw=0.8, alpha=0.7, marker=".", label=f"task {j}")
    ax.set(xlabel="after task", ylabel="accuracy (%)", ylim=(0, 100), title=title or "Accuracy over tasks")
    ax.set_xticks(steps)
    return _finish(fig, ax, path)


def plot_accuracy_matrix(acc_matrix: Matrix, path: Path, title: str = "") -> Path:
    """The accuracy matrix as a heatmap: row i = after task i, column j = tested on task j, every cell annotated
    with its accuracy (%), every task ticked on both axes; cells not yet seen (j > i) are blank."""
    import numpy as np

    plt = pyplot()
    rows, cols = len(acc_matrix), max(len(r) for r in acc_matrix)
    grid = np.full((rows, cols), np.nan)
    for i, row in enumerate(acc_matrix):
        grid[i, : len(row)] = [100 * a for a in row]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * cols, 1.0 + 0.45 * rows), dpi=90)
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(acc_matrix):
        for j, acc in enumerate(row):
            ax.text(j, i, f"{100 * acc:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if acc < 0.6 else "black")
    ax.set(xlabel="tested on task", ylabel="after task", title=title or "Accuracy matrix (%)")
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return save_figure(fig, path)


def plot_beta_evolution(betas: list[list[float]], path: Path, threshold: float | None = None) -> Path:
    """One line per task t: the gate values over the adapters after task t."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
    for t, row in enumerate(betas):
        ax.plot(range(len(row)), row, marker="o", lw=1, label=f"after task {t}")
    if threshold is not None:
        ax.axhline(threshold, color="r", ls="--", lw=1, label="growth threshold")
    ax.set(xlabel="adapter (task index)", ylabel="beta (mean over layers)", title="Beta evolution")
    return _finish(fig, ax, path)


def plot_beta_heatmap(betas: list[list[float]], path: Path) -> Path:
    """Tasks (rows) x adapters (columns) heatmap of the gate values; adapters not yet created are blank."""
    import numpy as np

    plt = pyplot()
    n = len(betas)
    width = max(len(r) for r in betas)
    grid = np.full((n, width), np.nan)
    for t, row in enumerate(betas):
        grid[t, : len(row)] = row
    fig, ax = plt.subplots(figsize=(5, 4), dpi=90)
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set(xlabel="adapter (task index)", ylabel="after task", title="Beta heatmap")
    ax.set_xticks(range(width))
    ax.set_yticks(range(n))
    fig.colorbar(image, ax=ax, label="beta")
    return save_figure(fig, path)
