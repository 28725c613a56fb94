"""Per-adapter training hooks, built from the adapter config and the public ``adapters`` API only."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from trainers.callbacks import TrainerCallback
from trainers.optimizers import is_gate_parameter

if TYPE_CHECKING:
    from trainers.trainer import Trainer


class GateL1Loss(TrainerCallback):
    """The official SoRA code's extra loss ``l1_lambda * mean(|g|)``: the sum of |g| over every gate entry of
    every layer divided by the number of entries (one global mean, not a mean of per-layer means)."""

    def __init__(self, l1_lambda: float) -> None:
        self.l1_lambda = float(l1_lambda)

    def extra_losses(self, trainer: Trainer, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gates = [p for n, p in trainer.model.named_parameters() if is_gate_parameter(n) and p.requires_grad]
        if not gates:
            return {}
        total = sum(g.numel() for g in gates)
        return {"gate_l1": self.l1_lambda * torch.stack([g.abs().sum() for g in gates]).sum() / total}


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


def _sora_hooks(adapter_cfg: Any) -> list[TrainerCallback]:
    from trainers.sora_report import SoraFinish, SoraStageReport

    hooks: list[TrainerCallback] = [GateL1Loss(adapter_cfg.l1_lambda)] if adapter_cfg.l1_lambda > 0 else []
    return hooks + [SoraStageReport(), SoraFinish()]


def _gumbel_hooks(adapter_cfg: Any) -> list[TrainerCallback]:
    hooks: list[TrainerCallback] = [GumbelTemperature(adapter_cfg.tau_init, adapter_cfg.tau_final,
                                                      adapter_cfg.anneal_rate)]
    if adapter_cfg.lambda_sparsity > 0:
        hooks.append(GumbelSparsityLoss(adapter_cfg.lambda_sparsity))
    return hooks


ADAPTER_HOOKS: dict[str, Callable[[Any], list[TrainerCallback]]] = {
    "sora": _sora_hooks,
    "gumbel": _gumbel_hooks,
}


def adapter_callbacks(adapter_cfg: Any) -> list[TrainerCallback]:
    """The training hooks an adapter needs (none for LoRA and DoRA)."""
    build = ADAPTER_HOOKS.get(adapter_cfg.name)
    return build(adapter_cfg) if build else []
