"""GLUE metrics on gathered predictions (scikit-learn / scipy), and which one is a task's ``eval_score``.

A dataset names a metric family (``RawSplits.metric``); :func:`task_metrics` turns predictions and labels into
the family's metrics, each prefixed ``eval_``, plus ``eval_score``, the main one that sweeps and best-checkpoint
selection use. The main metrics follow the official SoRA scripts' ``metric_for_best_model``: CoLA Matthews
correlation, MRPC F1, STS-B Pearson, accuracy for the others (QQP reports F1 too).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# family -> (metrics it reports, the main one)
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "accuracy": (("accuracy",), "accuracy"),
    "matthews": (("matthews_correlation", "accuracy"), "matthews_correlation"),
    "f1": (("f1", "accuracy"), "f1"),
    "f1_accuracy": (("f1", "accuracy"), "accuracy"),
    "pearson": (("pearson", "spearmanr"), "pearson"),
}


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of ``preds == labels``."""
    return float(np.mean(np.asarray(preds) == np.asarray(labels))) if len(labels) else 0.0


def matthews_correlation(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation ``(tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))`` (0 when a factor is 0)."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds))


def f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of class 1: ``2 tp / (2 tp + fp + fn)`` (0 when there is no positive at all)."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0.0))


def pearson(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson correlation of predictions and labels (nan when either is constant)."""
    from scipy.stats import pearsonr

    if len(set(map(float, preds))) < 2 or len(set(map(float, labels))) < 2:
        return float("nan")
    return float(pearsonr(preds, labels)[0])


def spearman(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman rank correlation of predictions and labels (nan when either is constant)."""
    from scipy.stats import spearmanr

    if len(set(map(float, preds))) < 2 or len(set(map(float, labels))) < 2:
        return float("nan")
    return float(spearmanr(preds, labels)[0])


FUNCTIONS = {"accuracy": accuracy, "matthews_correlation": matthews_correlation, "f1": f1, "pearson": pearson,
             "spearmanr": spearman}


def task_metrics(family: str, preds: Sequence[float], labels: Sequence[float],
                 prefix: str = "eval_") -> dict[str, float]:
    """``{prefix + metric: value}`` for every metric of ``family`` plus ``{prefix}score`` (the main metric)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown metric family {family!r} (choose from: {', '.join(FAMILIES)})")
    names, main = FAMILIES[family]
    out = {f"{prefix}{name}": FUNCTIONS[name](preds, labels) for name in names}
    out[f"{prefix}score"] = out[f"{prefix}{main}"]
    return out
