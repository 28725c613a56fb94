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
    anneal_rate: float = MISSING
    lambda_sparsity: float = MISSING
    growth_threshold: float = MISSING
    conditional_growth: bool = MISSING
    gate_logit_lr: float | None = MISSING


def is_gate_logit_parameter(name: str) -> bool:
    """Gumbel CL-LoRA task-gate logits (``*.gate_logits``)."""
    return name.endswith(".gate_logits")


# --------------------------------------------------------------------------------------------- callbacks
class GumbelTemperature(TrainerCallback):
    """Anneal the Gumbel-Sparsemax temperature per optimizer step:
    ``tau = max(tau_final, tau_init * anneal_rate ** step)`` (a function of the step, so resumes are exact)."""

    def __init__(self, tau_init: float, tau_final: float, anneal_rate: float) -> None:
        self.tau_init, self.tau_final, self.anneal_rate = float(tau_init), float(tau_final), float(anneal_rate)

    def tau(self, step: int) -> float:
        return max(self.tau_final, self.tau_init * self.anneal_rate ** step)

    def _set(self, trainer: Trainer) -> None:
        from adapters import set_gumbel_tau

        set_gumbel_tau(trainer.model, self.tau(trainer.state.global_step))

    def on_train_begin(self, trainer: Trainer) -> None:  # the first step's tau (and a resumed run's)
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
def growth_decision(beta_values: torch.Tensor, task: int, threshold: float, enabled: bool = True) -> bool:
    """Keep adapter ``task`` iff beta_task > threshold (always when growth is disabled, and for task 0)."""
    beta = beta_values[task]  # compared in the gate's own precision: float32(0.1) > 0.1 in float64
    return not enabled or task == 0 or bool(beta > torch.tensor(threshold, dtype=beta.dtype))


def conditional_growth(model: nn.Module, task: int, adapter_cfg: Any, run_dir: Path,
                       main: bool = True) -> dict[str, Any]:
    """Decide, prune, log and (``main``) save ``beta_values_task_{task}.pt``; returns what was decided.
    Every process calls it, so all of them prune the same adapter."""
    from adapters import gumbel_active_tasks, gumbel_betas, prune_gumbel_task

    layer_betas = gumbel_betas(model)
    beta = layer_betas.mean(0)
    threshold = float(adapter_cfg.growth_threshold)
    keep = growth_decision(beta, task, threshold, bool(adapter_cfg.conditional_growth))
    shown = "[" + " ".join(f"{b:.4f}" for b in beta.tolist()) + "]"
    log.info("[Conditional Growth] Task %d - Beta values: %s", task, shown)
    log.info("[Conditional Growth] Current task beta: %.4f, threshold: %.4f", float(beta[task]), threshold)
    if keep:
        why = (f"beta={float(beta[task]):.4f} > {threshold:.4f}" if growth_decision(beta, task, threshold)
               else "first task" if task == 0 else "conditional growth disabled")
        log.info("[Conditional Growth] Keeping adapter for task %d (%s)", task, why)
    else:
        prune_gumbel_task(model, task)
        log.info("[Conditional Growth] Pruning adapter for task %d (beta=%.4f <= %.4f)", task, float(beta[task]),
                 threshold)
    mask = gumbel_active_tasks(model)
    active, total = int(mask.sum()), len(mask)
    log.info("[Conditional Growth] Active adapters: %d/%d (%.1f%%)", active, total, 100.0 * active / total)
    if main:
        torch.save({"beta_values": beta, "pruning_mask": mask, "layer_beta_values": layer_betas, "task": task,
                    "threshold": threshold, "kept": keep}, Path(run_dir) / f"beta_values_task_{task}.pt")
    return {"beta_values": beta.tolist(), "pruning_mask": mask.tolist(), "kept": keep}



# --------------------------------------------------------------------------------------------- plug-in
class GumbelMethod(Method):
    name = "gumbel"
    schema = GumbelSchema
    layer_keys = {"use_rslora": "use_rslora", "tau_init": "tau"}

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        adapter = cfg.adapter
        require(adapter.tau_init > 0 and adapter.tau_final > 0, "adapter.tau_init and adapter.tau_final must be > 0")
        require(0 < adapter.anneal_rate <= 1, f"adapter.anneal_rate must be in (0, 1] (got {adapter.anneal_rate})")
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
        return [OptimizerSpec("base", groups, adamw(tcfg.base_lr, tcfg.betas, tcfg.weight_decay),
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
