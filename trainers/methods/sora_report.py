"""SoRA reporting and end-of-run exports (callbacks of the SoRA plug-in, ``trainers.methods.sora``).

After every stage (:class:`SoraStageReport`): one row in ``stages.csv`` (stage, xi, eval accuracy and
loss, gate zero ratio, kept adapter parameters, per-module effective ranks as JSON, times), the plot
``stages.png`` (accuracy against gate zero ratio and against kept adapter parameters, one point per
stage) and, when the schedule has several stages, the checkpoint ``checkpoints/stage-<name>``.

At the end of the run (:class:`SoraFinish`): ``prune_sora_model`` drops every rank whose gate is 0,
the logits of an evaluation batch are checked to be unchanged, and run.py then exports the pruned
adapter (PEFT format, per-module ranks in ``rank_pattern``). With ``trainer.save_merged=true`` the
pruned adapter is also folded into a copy of the model, saved with ``save_pretrained`` under
``merged/`` (plus the tokenizer), reloaded with ``AutoModelForSequenceClassification`` and checked to
give the same logits. ``sora_export.json`` records ranks before/after and the measured differences.

Kept adapter parameters of a layer: ``r_eff * (in_features + out_features)`` (the A and B entries of
the pruned adapter; the task head is not counted).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainers.core.files import atomic_write_text
from trainers.core.plots import pyplot, save_figure
from trainers.loop.hooks import TrainerCallback

if TYPE_CHECKING:
    from trainers.loop.stages import Stage
    from trainers.loop.trainer import Trainer

log = logging.getLogger(__name__)

STAGES_CSV = "stages.csv"
STAGES_PNG = "stages.png"
SWEEP_PNG = "sweep_curve.png"
EXPORT_JSON = "sora_export.json"
MERGED_DIR = "merged"
COLUMNS = ("stage", "name", "xi", "step", "eval_accuracy", "eval_loss", "gate_zero_ratio", "nonzero_adapter_params",
           "adapter_params", "stage_time_s", "wall_time_s", "effective_ranks")
CHECK_EXAMPLES = 64        # evaluation examples whose logits must survive pruning / merging
# atol = rtol for those logits: float32 runs, and mixed precision (accelerate runs the model's forward in
# bf16/fp16 autocast, whose rounding alone moves logits by ~1e-2)
CHECK_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}


# --------------------------------------------------------------------------------------------- counting
def adapter_param_counts(model: nn.Module) -> tuple[int, int]:
    """``(kept, total)`` adapter parameters over the SoRA layers: ``sum r_eff*(in+out)`` and ``sum r*(in+out)``."""
    from adapters import SoraLinear, adapter_layers

    kept = total = 0
    for layer in adapter_layers(model, SoraLinear).values():
        width = layer.lora_A.shape[1] + layer.lora_B.shape[0]
        kept += layer.effective_rank() * width
        total += layer.r * width
    return kept, total


# --------------------------------------------------------------------------------------------- files
def write_stages_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with the keys of :data:`COLUMNS`) atomically; ``effective_ranks`` as JSON."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "effective_ranks": json.dumps(row["effective_ranks"], sort_keys=True)})
    atomic_write_text(path, text.getvalue())


def read_stages_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``stages.csv`` with numbers parsed and ``effective_ranks`` decoded."""
    rows = []
    with Path(path).open(encoding="utf-8", newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = dict(raw)
            for key in ("stage", "step", "nonzero_adapter_params", "adapter_params"):
                row[key] = int(row[key])
            for key in ("xi", "eval_accuracy", "eval_loss", "gate_zero_ratio", "stage_time_s", "wall_time_s"):
                row[key] = float(row[key])
            row["effective_ranks"] = json.loads(row["effective_ranks"])
            rows.append(row)
    return rows


def short_value(value: Any) -> str:
    """A swept value for a plot label: numbers (also numeric text) to 4 significant digits (0.30000000000000004 ->
    0.3), anything else as is."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}" if not isinstance(value, bool) else str(value)


def plot_curve(points: Sequence[dict[str, Any]], labels: Sequence[str], path: Path, title: str,
               sort_by_x: bool = False) -> Path:
    """Two panels, one point per entry of ``points``: eval_accuracy against gate_zero_ratio and against
    nonzero_adapter_params, each point annotated with its label, joined in the order given (stages) or, with
    ``sort_by_x``, from left to right (sweep jobs). Written as PNG (matplotlib, Agg)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, xlabel in ((axes[0], "gate_zero_ratio", "gate zero ratio"),
                            (axes[1], "nonzero_adapter_params", "non-zero adapter parameters")):
        order = sorted(range(len(points)), key=lambda i: points[i][key]) if sort_by_x else range(len(points))
        xs = [points[i][key] for i in order]
        acc = [points[i]["eval_accuracy"] for i in order]
        labels_here = [labels[i] for i in order]
        ax.plot(xs, acc, "o-")
        for x, y, label in zip(xs, acc, labels_here, strict=True):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path, dpi=100)


# --------------------------------------------------------------------------------------------- stages
class SoraStageReport(TrainerCallback):
    """Per stage: a ``stages.csv`` row, ``stages.png``, and a named checkpoint when there are several stages.

    The rows live in the callback state (saved in every checkpoint), and the CSV is rewritten from them,
    so a resumed run ends with exactly the rows of an uninterrupted one.
    """

    def __init__(self, sparse_lambda: float = 0.0) -> None:
        self.sparse_lambda = float(sparse_lambda)  # the xi of stages that do not set their own
        self.rows: list[dict[str, Any]] = []
        self.stage_started = 0.0  # trainer wall time when the current stage began

    def _write(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        csv_path, png_path = trainer.run_dir / STAGES_CSV, trainer.run_dir / STAGES_PNG
        if not self.rows:
            csv_path.unlink(missing_ok=True)
            png_path.unlink(missing_ok=True)
            return
        write_stages_csv(csv_path, self.rows)
        plot_curve(self.rows, [f"xi={r['xi']:g}" for r in self.rows], png_path,
                   f"SoRA: accuracy vs sparsity ({len(self.rows)} stage(s))")

    def on_train_begin(self, trainer: Trainer) -> None:
        self._write(trainer)  # a resumed run drops rows written after its checkpoint

    def on_stage_begin(self, trainer: Trainer, stage: Stage) -> None:
        self.stage_started = trainer.wall_time()

    def on_stage_end(self, trainer: Trainer, stage: Stage, metrics: dict[str, float]) -> None:
        from adapters import effective_ranks

        index = trainer.state.stage_index
        kept, total = adapter_param_counts(trainer.model)
        wall = trainer.wall_time()
        xi = float(stage.params.get("sparse_lambda", self.sparse_lambda))
        row = {"stage": index, "name": stage.name, "xi": xi, "step": trainer.state.global_step,
               "eval_accuracy": metrics.get("eval_accuracy", metrics.get("eval_score", float("nan"))),
               "eval_loss": metrics["eval_loss"],
               "gate_zero_ratio": metrics.get("gate_zero_ratio", 0.0), "nonzero_adapter_params": kept,
               "adapter_params": total, "stage_time_s": round(wall - self.stage_started, 3),
               "wall_time_s": round(wall, 3), "effective_ranks": effective_ranks(trainer.model)}
        self.rows = [r for r in self.rows if r["stage"] < index] + [row]
        self._write(trainer)
        if trainer.is_main:
            log.info("stage %s (xi=%g): accuracy %.4f, gate zero ratio %.4f, %d of %d adapter parameters kept",
                     stage.name, xi, row["eval_accuracy"], row["gate_zero_ratio"], kept, total)
        if len(trainer.stages) > 1:
            trainer.save_checkpoint(f"stage-{stage.name}")

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "stage_started": self.stage_started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state.get("rows", []))
        self.stage_started = float(state.get("stage_started", 0.0))


# --------------------------------------------------------------------------------------------- end of run
@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(**batch).logits.float()
    model.train(was_training)
    return out


def _check(name: str, got: torch.Tensor, want: torch.Tensor, precision: str = "fp32") -> float:
    diff = float((got - want).abs().max()) if got.numel() else 0.0
    tol = CHECK_TOLERANCE[precision]
    if got.shape != want.shape or not torch.allclose(got, want, atol=tol, rtol=tol):
        raise RuntimeError(f"{name} changed the model's outputs (max |logit difference| {diff:.3g} > "
                           f"{tol}); this is a bug, please report it")
    return diff


def check_batch(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Up to :data:`CHECK_EXAMPLES` evaluation examples (without labels) on the trainer's device."""
    examples = [trainer.data.eval[i] for i in range(min(CHECK_EXAMPLES, len(trainer.data.eval)))]
    batch = trainer.collate(examples)
    batch.pop("labels")
    return {k: v.to(trainer.accelerator.device) for k, v in batch.items()}


def save_merged(trainer: Trainer, batch: dict[str, torch.Tensor], want: torch.Tensor) -> float:
    """Fold the adapter into a copy of the model, ``save_pretrained`` it (and the tokenizer) to ``merged/``,
    reload it with ``AutoModelForSequenceClassification`` (``AutoModelForCausalLM`` for causal-LM datasets);
    returns the max |logit difference|."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from adapters import merge_model
    from trainers.models.loading import load_tokenizer

    out = trainer.run_dir / MERGED_DIR
    merged = copy.deepcopy(trainer.model)
    merge_model(merged, unload=True)
    merged.requires_grad_(False)
    merged.save_pretrained(out)
    load_tokenizer(trainer.cfg.model).save_pretrained(out)
    causal = trainer.cfg.dataset.get("task", "classification") == "causal_lm"
    auto_class = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    reloaded = auto_class.from_pretrained(out).to(trainer.accelerator.device)
    return _check("merging (reloaded from merged/)", _logits(reloaded, batch), want, trainer.cfg.trainer.precision)


class SoraFinish(TrainerCallback):
    """End of a SoRA run: prune, check the outputs, count what is kept, optionally save the merged model.

    Adds ``nonzero_adapter_params`` and ``adapter_params`` to the final metrics.
    """

    def on_run_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        from adapters import SoraLinear, adapter_layers, prune_sora_model

        model = trainer.model
        batch = check_batch(trainer)
        before = _logits(model, batch)
        ranks_before = {name: layer.r for name, layer in adapter_layers(model, SoraLinear).items()}
        kept, total = adapter_param_counts(model)
        ranks_after = prune_sora_model(model)
        report: dict[str, Any] = {"ranks_before": ranks_before, "ranks_after": ranks_after,
                                  "check_examples": int(before.shape[0]),
                                  "pruned_max_abs_logit_diff": _check("pruning", _logits(model, batch), before,
                                                                              trainer.cfg.trainer.precision)}
        result.update(nonzero_adapter_params=kept, adapter_params=total)
        if trainer.is_main:
            if trainer.cfg.trainer.get("save_merged", False):
                report["merged_max_abs_logit_diff"] = save_merged(trainer, batch, before)
            (trainer.run_dir / EXPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            log.info("pruned SoRA: %d of %d adapter parameters kept (ranks %s); outputs unchanged (max diff %.2g)",
                     kept, total, sorted(set(ranks_after.values())), report["pruned_max_abs_logit_diff"])
        trainer.accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------- sweeps
def plot_sweep(sweep_dir: Path, rows: Sequence[dict[str, Any]]) -> Path | None:
    """``sweep_curve.png``: the accuracy-vs-sparsity plot with one point per completed SoRA job (None if none).

    ``rows`` are ``trainers.reports.collect_sweep``'s; a job's point comes from its ``metrics.json``.
    """
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row.get("_swept", []) if k not in keys)
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
    points, labels = [], []
    for row in rows:
        try:
            metrics = json.loads((Path(sweep_dir) / row["job"] / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if metrics.get("status") != "completed" or metrics.get("nonzero_adapter_params") is None:
            continue
        points.append(metrics)
        labels.append(" ".join(f"{k.rsplit('.', 1)[-1]}={short_value(row.get(k))}" for k in varying)
                      or f"job {row['job']}")
    if not points:
        return None
    return plot_curve(points, labels, Path(sweep_dir) / SWEEP_PNG,
                      f"SoRA sweep: accuracy vs sparsity ({len(points)} jobs)", sort_by_x=True)
