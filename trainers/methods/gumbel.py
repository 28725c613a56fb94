"""Gumbel CL-LoRA as a method plug-in (continual learning with a Gumbel-Sparsemax gate over task adapters).

What it adds to a run, all of it here: its config (:class:`GumbelSchema`, ``conf/adapter/gumbel.yaml``),
the layer's initial temperature, the task-gate logits' own learning rate (``gate_logit_lr``), the
per-step temperature annealing and the entropy loss, and, between tasks of a continual run, opening a
new direction and the conditional-growth decision (``beta_values_task_{t}.pt``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import MISSING, DictConfig
from torch import nn

from trainers.loop.hooks import TrainerCallback
from trainers.loop.optimizers import OptimizerSpec
from trainers.methods.base import LoraSchema, Method, adamw, require

if TYPE_CHECKING:
    from trainers.loop.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class GumbelSchema(LoraSchema):
    tau_init: float = MISSING
    tau_final: float = MISSING
    anneal_rate: float | None = MISSING
    lambda_sparsity: float = MISSING
    growth_threshold: float = MISSING
    conditional_growth: bool = MISSING
    growth_score: str = MISSING
    gate: str = MISSING
    gate_logit_lr: float | None = MISSING


def is_gate_logit_parameter(name: str) -> bool:
    """Gumbel CL-LoRA task-gate logits (``*.gate_logits``)."""
    return name.endswith(".gate_logits")


# --------------------------------------------------------------------------------------------- callbacks
class GumbelTemperature(TrainerCallback):
    """Anneal the Gumbel-Sparsemax temperature per optimizer step of each task:
    ``tau = max(tau_final, tau_init * rate ** step)``, with ``rate = anneal_rate`` when given, else
    ``(tau_final / tau_init) ** (1 / steps)`` for the ``steps`` of the task's Trainer, so tau reaches tau_final
    exactly at the task's last step. A function of the step (and the task's length), so resumes are exact."""

    def __init__(self, tau_init: float, tau_final: float, anneal_rate: float | None) -> None:
        self.tau_init, self.tau_final = float(tau_init), float(tau_final)
        self.anneal_rate = None if anneal_rate is None else float(anneal_rate)
        self.total_steps: int | None = None  # of the task being trained (known at on_train_begin)

    def rate(self) -> float:
        """The per-step factor: ``anneal_rate``, or the one that reaches tau_final in ``total_steps`` steps."""
        if self.anneal_rate is not None:
            return self.anneal_rate
        if not self.total_steps:
            return 1.0
        return (self.tau_final / self.tau_init) ** (1.0 / self.total_steps)

    def tau(self, step: int) -> float:
        if self.anneal_rate is None and self.total_steps and step >= self.total_steps:
            return self.tau_final  # exactly, whatever the rounding of rate ** steps
        return max(self.tau_final, self.tau_init * self.rate() ** step)

    def _set(self, trainer: Trainer) -> None:
        from adapters import set_gumbel_tau

        set_gumbel_tau(trainer.model, self.tau(trainer.state.global_step))

    def on_train_begin(self, trainer: Trainer) -> None:  # the first step's tau (and a resumed run's)
        self.total_steps = int(trainer.total_steps)
        self._set(trainer)

    def on_step_end(self, trainer: Trainer) -> None:  # the next step's tau, also used by evaluations in between
        self._set(trainer)

    def log_values(self, trainer: Trainer) -> dict[str, float]:
        return {"tau": self.tau(trainer.state.global_step)}


class GumbelSparsityLoss(TrainerCallback):
    """``lambda_sparsity * entropy(beta)`` of the task gates used in the forward pass."""

    def __init__(self, lambda_sparsity: float) -> None:
        self.lambda_sparsity = float(lambda_sparsity)

    def extra_losses(self, trainer: Trainer, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from adapters import gumbel_sparsity_loss

        return {"sparsity": self.lambda_sparsity * gumbel_sparsity_loss(trainer.model).to(outputs.loss.device)}


# --------------------------------------------------------------------------------------------- growth
GROWTH_SCORES = ("contribution", "beta")


def growth_decision(beta_values: torch.Tensor, task: int, threshold: float, enabled: bool = True) -> bool:
    """Keep adapter ``task`` iff its score (beta, or its contribution share) > threshold (always when growth is
    disabled, and for task 0)."""
    beta = beta_values[task]  # compared in the gate's own precision: float32(0.1) > 0.1 in float64
    return not enabled or task == 0 or bool(beta > torch.tensor(threshold, dtype=beta.dtype))


def growth_scores(model: nn.Module, rule: str) -> torch.Tensor:
    """Per-task scores the growth rule compares with the threshold, mean over layers: ``beta`` (the seed's rule:
    the noise-free gate) or ``contribution`` (|beta_t alpha_t| / sum_k |beta_k alpha_k|, the adapter's share of the
    update; see docs/CONTINUAL.md)."""
    from adapters import gumbel_betas, gumbel_contributions

    return (gumbel_betas(model) if rule == "beta" else gumbel_contributions(model)).mean(0)


def conditional_growth(model: nn.Module, task: int, adapter_cfg: Any, run_dir: Path,
                       main: bool = True) -> dict[str, Any]:
    """At tau = tau_final: score the adapters, keep adapter ``task`` iff its score > threshold, drop every adapter
    (old or new) whose noise-free beta is exactly 0 (layer by layer), log, and (``main``) save
    ``beta_values_task_{task}.pt``; returns what was decided (``model_changed``: whether the Trainer's last test of
    task ``task`` no longer holds). Every process calls it, so all prune the same."""
    from adapters import (
        GumbelLinear,
        adapter_layers,
        drop_zero_beta_tasks,
        gumbel_active_tasks,
        gumbel_betas,
        prune_gumbel_task,
        set_gumbel_tau,
    )

    taus = {layer.tau for layer in adapter_layers(model, GumbelLinear).values()}
    set_gumbel_tau(model, float(adapter_cfg.tau_final))  # the decision is taken at the final temperature
    layer_betas = gumbel_betas(model)
    beta = layer_betas.mean(0)
    rule = str(adapter_cfg.growth_score)
    scores = beta if rule == "beta" else growth_scores(model, rule)
    threshold = float(adapter_cfg.growth_threshold)
    enabled = bool(adapter_cfg.conditional_growth)
    keep = growth_decision(scores, task, threshold, enabled)
    shown = "[" + " ".join(f"{b:.4f}" for b in beta.tolist()) + "]"
    log.info("[Conditional Growth] Task %d - Beta values: %s", task, shown)
    if rule != "beta":
        log.info("[Conditional Growth] Task %d - Contributions: [%s]", task,
                 " ".join(f"{c:.4f}" for c in scores.tolist()))
    log.info("[Conditional Growth] Current task %s: %.4f, threshold: %.4f",
             "beta" if rule == "beta" else "contribution", float(scores[task]), threshold)
    if keep:
        why = (f"{rule}={float(scores[task]):.4f} > {threshold:.4f}" if growth_decision(scores, task, threshold)
               else "first task" if task == 0 else "conditional growth disabled")
        log.info("[Conditional Growth] Keeping adapter for task %d (%s)", task, why)
    else:
        prune_gumbel_task(model, task)
        log.info("[Conditional Growth] Pruning adapter for task %d (%s=%.4f <= %.4f)", task, rule,
                 float(scores[task]), threshold)
    dropped = drop_zero_beta_tasks(model) if enabled else {}
    if dropped:
        log.info("[Conditional Growth] Dropping adapters with beta exactly 0: %s",
                 ", ".join(f"task {t} in {n} layer(s)" for t, n in sorted(dropped.items())))
    mask = gumbel_active_tasks(model)
    active, total = int(mask.sum()), len(mask)
    log.info("[Conditional Growth] Active adapters: %d/%d (%.1f%%)", active, total, 100.0 * active / total)
    if main:
        torch.save({"beta_values": beta, "pruning_mask": mask, "layer_beta_values": layer_betas, "task": task,
                    "threshold": threshold, "kept": keep, "scores": scores, "growth_score": rule},
                   Path(run_dir) / f"beta_values_task_{task}.pt")
    changed = not keep or bool(dropped) or taus != {float(adapter_cfg.tau_final)}
    return {"beta_values": beta.tolist(), "pruning_mask": mask.tolist(), "kept": keep,
            "growth_scores": scores.tolist(), "dropped_zero_beta": sorted(dropped), "model_changed": changed}


# --------------------------------------------------------------------------------------------- plug-in
class GumbelMethod(Method):
    name = "gumbel"
    schema = GumbelSchema
    layer_keys = {"use_rslora": "use_rslora", "tau_init": "tau", "gate": "gate"}

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        adapter = cfg.adapter
        require(adapter.tau_init > 0 and adapter.tau_final > 0, "adapter.tau_init and adapter.tau_final must be > 0")
        require(adapter.anneal_rate is None or 0 < adapter.anneal_rate <= 1,
                f"adapter.anneal_rate must be null or in (0, 1] (got {adapter.anneal_rate})")
        require(adapter.gate in ("layer", "global"), f"adapter.gate must be layer or global (got {adapter.gate!r})")
        require(adapter.growth_score in GROWTH_SCORES,
                f"adapter.growth_score must be one of {', '.join(GROWTH_SCORES)} (got {adapter.growth_score!r})")
        require(adapter.lambda_sparsity >= 0, f"adapter.lambda_sparsity must be >= 0 (got {adapter.lambda_sparsity})")
        require(adapter.gate_logit_lr is None or adapter.gate_logit_lr > 0,
                f"adapter.gate_logit_lr must be null or > 0 (got {adapter.gate_logit_lr})")

    def optimizers(self, model: nn.Module, cfg: DictConfig) -> list[OptimizerSpec]:
        """One AdamW; with ``adapter.gate_logit_lr`` the task-gate logits are its second param group (that lr,
        no weight decay)."""
        tcfg, logit_lr = cfg.trainer, cfg.adapter.gate_logit_lr
        base, logits = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (logits if logit_lr is not None and is_gate_logit_parameter(name) else base).append(param)
        groups: list[dict[str, Any]] = [{"params": base}]
        if logits:
            groups.append({"params": logits, "lr": float(logit_lr), "weight_decay": 0.0})
        return [OptimizerSpec("base", groups, adamw(tcfg.base_lr, tcfg.betas, tcfg.weight_decay, tcfg.optimizer_impl),
                              float(tcfg.warmup_ratio))]

    def grad_components(self, cfg: DictConfig) -> dict[str, str]:
        return {**super().grad_components(cfg), "magnitude": r"(^|\.)magnitudes$", "gate": r"(^|\.)gate_logits$"}

    def callbacks(self, cfg: DictConfig) -> list[TrainerCallback]:
        adapter = cfg.adapter
        hooks: list[TrainerCallback] = [GumbelTemperature(adapter.tau_init, adapter.tau_final, adapter.anneal_rate)]
        if adapter.lambda_sparsity > 0:
            hooks.append(GumbelSparsityLoss(adapter.lambda_sparsity))
        return hooks

    def begin_task(self, model: nn.Module, task: int) -> None:
        from adapters import add_gumbel_task

        add_gumbel_task(model)

    def end_task(self, model: nn.Module, task: int, cfg: DictConfig, run_dir: Path, main: bool) -> dict[str, Any]:
        return conditional_growth(model, task, cfg.adapter, run_dir, main)

    def adapters_kept(self, model: nn.Module) -> tuple[int, int]:
        from adapters import gumbel_active_tasks

        mask = gumbel_active_tasks(model)
        return int(mask.sum()), len(mask)

    def continual_summary(self, model: nn.Module, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        return {"beta_values": tasks[-1].get("beta_values")}


METHOD = GumbelMethod()
