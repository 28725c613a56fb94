"""Split optimizers (SoRA gates vs. everything else) and their warmup schedules."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

THRESHOLD_MODES = ("lr_scaled", "absolute")


def is_gate_parameter(name: str) -> bool:
    """SoRA gates are the parameters named ``*.gate`` (one ``(r,)`` vector per SoraLinear)."""
    return name == "gate" or name.endswith(".gate")


def is_gate_logit_parameter(name: str) -> bool:
    """Gumbel CL-LoRA task-gate logits (``*.gate_logits``): their own AdamW param group, see ``logit_lr``."""
    return name.endswith(".gate_logits")


class ProximalAdamW(torch.optim.AdamW):
    """AdamW without weight decay followed by the L1 proximal step (soft-thresholding).

    After the AdamW update every parameter becomes ``sign(p) * max(|p| - t, 0)`` with
    ``t = sparse_lambda * lr`` (``threshold_mode="lr_scaled"``, the current lr of the param group,
    so it follows the schedule) or ``t = sparse_lambda`` (``"absolute"``). ``sparse_lambda`` and
    ``threshold_mode`` live in each param group, so they are saved in ``state_dict()`` and can be
    changed between stages with :func:`set_sparse_lambda`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-8, sparse_lambda: float = 0.0, threshold_mode: str = "lr_scaled") -> None:
        if sparse_lambda < 0:
            raise ValueError(f"sparse_lambda must be >= 0, got {sparse_lambda}")
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        self.defaults.update(sparse_lambda=sparse_lambda, threshold_mode=threshold_mode)
        for group in self.param_groups:
            group.setdefault("sparse_lambda", sparse_lambda)
            group.setdefault("threshold_mode", threshold_mode)

    def threshold(self, group: dict[str, Any]) -> float:
        """The soft-threshold ``t`` this group uses at the current learning rate."""
        scale = group["lr"] if group["threshold_mode"] == "lr_scaled" else 1.0
        return float(group["sparse_lambda"]) * float(scale)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = super().step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                t = self.threshold(group)
                if t <= 0:
                    continue
                for p in group["params"]:
                    if p.grad is not None:
                        p.copy_(torch.sign(p) * torch.clamp(p.abs() - t, min=0.0))
        return loss


def set_sparse_lambda(optimizer: torch.optim.Optimizer | None, value: float) -> None:
    """Change the soft-threshold strength of a :class:`ProximalAdamW` (e.g. at a new xi stage)."""
    if optimizer is None:
        return
    if value < 0:
        raise ValueError(f"sparse_lambda must be >= 0, got {value}")
    for group in optimizer.param_groups:
        group["sparse_lambda"] = float(value)


def build_sora_optimizers(model: nn.Module, base_lr: float = 1e-4, gate_lr: float = 1e-3,
                          sparse_lambda: float = 0.0, betas: tuple[float, float] = (0.9, 0.98),
                          weight_decay: float = 0.01, threshold_mode: str = "lr_scaled",
                          logit_lr: float | None = None) -> tuple[ProximalAdamW | None, torch.optim.AdamW]:
    """Return ``(gate_opt, base_opt)``.

    ``gate_opt`` is a :class:`ProximalAdamW` over the trainable ``*.gate`` parameters (``None`` when
    the model has none); ``base_opt`` is an AdamW with ``weight_decay`` over every other trainable
    parameter (adapters and the task head). With ``logit_lr``, task-gate logits (``*.gate_logits``) form a
    second param group of ``base_opt`` with that learning rate and no weight decay.
    """
    gates, base, logits = [], [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            if is_gate_parameter(name):
                gates.append(param)
            elif logit_lr is not None and is_gate_logit_parameter(name):
                logits.append(param)
            else:
                base.append(param)
    if not base:
        raise ValueError("the model has no trainable parameters besides gates; was an adapter applied?")
    betas = (float(betas[0]), float(betas[1]))
    groups: list[dict[str, Any]] = [{"params": base}]
    if logits:
        groups.append({"params": logits, "lr": float(logit_lr), "weight_decay": 0.0})
    base_opt = torch.optim.AdamW(groups, lr=base_lr, betas=betas, weight_decay=weight_decay)
    gate_opt = ProximalAdamW(gates, lr=gate_lr, betas=betas, sparse_lambda=sparse_lambda,
                             threshold_mode=threshold_mode) if gates else None
    return gate_opt, base_opt


def build_warmup_scheduler(optimizer: torch.optim.Optimizer | None, num_steps: int,
                           warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR | None:
    """Linear warmup over ``int(warmup_ratio * num_steps)`` steps, then linear decay to 0 (transformers)."""
    if optimizer is None:
        return None
    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * num_steps), num_steps)
