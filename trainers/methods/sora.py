"""SoRA (Ding et al., 2023) as a method plug-in: a gated LoRA whose gates get their own proximal optimizer.

What SoRA adds to a run, all of it here:
- config: ``conf/adapter/sora.yaml`` (:class:`SoraSchema`) and the top-level ``sparse_lambda``;
- the layer's ``gate_init``;
- optimizers: ``base`` (AdamW over everything trainable but the gates) and ``gate``, warmup
  ``adapter.gate_warmup_ratio``, lr ``adapter.gate_lr`` (null: 10x ``trainer.base_lr``, as the seed). The gate
  optimizer is :class:`ProximalAdamW` (AdamW without weight decay, then the soft-threshold
  ``g = sign(g) * max(|g| - t, 0)``, ``t = sparse_lambda * lr`` (``lr_scaled``) or ``sparse_lambda``
  (``soft_absolute``)), or with ``threshold_mode=official`` :class:`OfficialSparseAdamW`, the official code's
  ``SparseAdamW``;
- callbacks: the stage's ``sparse_lambda`` (xi stages), ``gate_lr``/``sparse_lambda`` in the log lines,
  ``gate_zero_ratio`` at every evaluation, the official code's optional L1 loss, ``stages.csv`` and the
  end-of-run prune + check + export (:mod:`trainers.methods.sora_report`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import MISSING, DictConfig
from torch import nn

from adapters import is_gate_parameter
from trainers.core.errors import UserError
from trainers.loop.hooks import TrainerCallback
from trainers.loop.optimizers import OptimizerSpec, build_adamw
from trainers.methods.base import LoraSchema, Method, adamw, require

if TYPE_CHECKING:
    from trainers.loop.stages import Stage
    from trainers.loop.trainer import Trainer

THRESHOLD_MODES = ("lr_scaled", "soft_absolute", "official")
RENAMED_MODES = {"absolute": "adapter.threshold_mode=absolute was renamed soft_absolute (a soft-threshold by "
                             "sparse_lambda, not the official code's rule); use soft_absolute, or official for the "
                             "official SoRA SparseAdamW"}
GATE_LR_FACTOR = 10.0  # adapter.gate_lr null: the gate lr is this x trainer.base_lr (the seed's setting)


@dataclass
class SoraSchema(LoraSchema):
    gate_lr: float | None = MISSING
    gate_init: str = MISSING
    threshold_mode: str = MISSING
    l1_lambda: float = MISSING
    gate_warmup_ratio: float = MISSING


# --------------------------------------------------------------------------------------------- optimizer
class ProximalAdamW(torch.optim.AdamW):
    """AdamW without weight decay followed by the L1 proximal step (soft-thresholding).

    After the AdamW update every parameter becomes ``sign(p) * max(|p| - t, 0)`` with
    ``t = sparse_lambda * lr`` (``threshold_mode="lr_scaled"``, the current lr of the param group,
    so it follows the schedule) or ``t = sparse_lambda`` (``"soft_absolute"``). ``sparse_lambda`` and
    ``threshold_mode`` live in each param group, so they are saved in ``state_dict()`` and can be
    changed between stages with :func:`set_sparse_lambda`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-8, sparse_lambda: float = 0.0, threshold_mode: str = "lr_scaled",
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        if sparse_lambda < 0:
            raise ValueError(f"sparse_lambda must be >= 0, got {sparse_lambda}")
        if threshold_mode in RENAMED_MODES:
            raise ValueError(RENAMED_MODES[threshold_mode])
        if threshold_mode not in ("lr_scaled", "soft_absolute"):
            raise ValueError(f"threshold_mode must be lr_scaled or soft_absolute, got {threshold_mode!r} "
                             f"(official: use OfficialSparseAdamW)")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, foreach=foreach, fused=fused)
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


class OfficialSparseAdamW(torch.optim.Optimizer):
    """The official SoRA code's ``SparseAdamW`` (``src/sparse_optimizer.py``): transformers' (legacy) AdamW, then a
    hard threshold by ``sparse_lambda`` (not scaled by the lr).

    Per parameter, with step ``k`` (from 1), gradient ``g`` and the group's lr ``a``::

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        p = p - a sqrt(1 - b2^k) / (1 - b1^k) * m / (sqrt(v) + eps)   [- a wd p, wd defaults to 0]

    (eps is added to ``sqrt(v)`` before the bias correction, unlike ``torch.optim.AdamW``), then the three masked
    assignments, in this order, each on the result of the previous one::

        p[p > l] -= l;   p[p < -l] += l;   p[|p| < l] = 0

    so every entry with ``|p| < 2 l`` ends at 0 and the others move ``l`` towards 0. Defaults are the official
    optimizer's: betas (0.9, 0.999), eps 1e-6, weight decay 0, bias correction on. ``sparse_lambda`` lives in each
    param group (saved in ``state_dict()``, changed by :func:`set_sparse_lambda`).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True,
                 sparse_lambda: float = 0.0) -> None:
        if sparse_lambda < 0:
            raise ValueError(f"sparse_lambda must be >= 0, got {sparse_lambda}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias, "sparse_lambda": sparse_lambda, "threshold_mode": "official"}
        super().__init__(params, defaults)

    def threshold(self, group: dict[str, Any]) -> float:
        """The threshold ``l`` of this group (independent of the lr)."""
        return float(group["sparse_lambda"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lam = self.threshold(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] = int(state["step"]) + 1
                k = state["step"]
                m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                denom = v.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2 ** k) / (1.0 - beta1 ** k)
                update = torch.div(m, denom) * (-step_size)
                if group["weight_decay"] > 0.0:
                    update = update + (-group["lr"] * group["weight_decay"]) * p
                p.add_(update)
                if lam > 0:
                    p[p > lam] -= lam
                    p[p < -lam] += lam
                    p[p.abs() < lam] = 0.0
        return loss


def set_sparse_lambda(optimizer: torch.optim.Optimizer | None, value: float) -> None:
    """Change the threshold strength of a :class:`ProximalAdamW` / :class:`OfficialSparseAdamW` (e.g. at a new
    xi stage)."""
    if optimizer is None:
        return
    if value < 0:
        raise ValueError(f"sparse_lambda must be >= 0, got {value}")
    for group in optimizer.param_groups:
        group["sparse_lambda"] = float(value)


def split_gate_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(gates, others)`` among the trainable parameters, in model order."""
    gates, others = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (gates if is_gate_parameter(name) else others).append(param)
    return gates, others


def build_sora_optimizers(model: nn.Module, base_lr: float = 1e-4, gate_lr: float = 1e-3,
                          sparse_lambda: float = 0.0, betas: tuple[float, float] = (0.9, 0.98),
                          weight_decay: float = 0.01,
                          threshold_mode: str = "lr_scaled") -> tuple[torch.optim.Optimizer | None, torch.optim.AdamW]:
    """The seed's API: ``(gate_opt, base_opt)``. ``gate_opt`` is a :class:`ProximalAdamW` over the trainable
    ``*.gate`` parameters (``None`` when the model has none; ``threshold_mode="official"``: an
    :class:`OfficialSparseAdamW` with its own betas/eps); ``base_opt`` an AdamW with ``weight_decay`` over
    every other trainable parameter (adapters and the task head)."""
    gates, base = split_gate_parameters(model)
    if not base:
        raise ValueError("the model has no trainable parameters besides gates; was an adapter applied?")
    betas = (float(betas[0]), float(betas[1]))
    base_opt = torch.optim.AdamW([{"params": base}], lr=base_lr, betas=betas, weight_decay=weight_decay)
    gate_opt = make_gate_optimizer(gates, gate_lr, betas, sparse_lambda, threshold_mode) if gates else None
    return gate_opt, base_opt


def make_gate_optimizer(params: Any, lr: float, betas: tuple[float, float], sparse_lambda: float,
                        threshold_mode: str, impl: str | None = None) -> torch.optim.Optimizer:
    """The gate optimizer of ``threshold_mode``: :class:`OfficialSparseAdamW` (official; its own betas 0.9/0.999 and
    eps 1e-6, as the official code builds it) or :class:`ProximalAdamW` (``betas``; its AdamW part run as ``impl``,
    see :func:`~trainers.loop.optimizers.build_adamw`; None: torch's default)."""
    if threshold_mode == "official":
        return OfficialSparseAdamW(params, lr=lr, sparse_lambda=sparse_lambda)
    return build_adamw(params, impl, ProximalAdamW, lr=lr, betas=betas, sparse_lambda=sparse_lambda,
                       threshold_mode=threshold_mode)


def resolve_gate_lr(cfg: DictConfig) -> float:
    """``adapter.gate_lr``, or ``GATE_LR_FACTOR x trainer.base_lr`` when it is null (the seed's 10x)."""
    value = cfg.adapter.get("gate_lr")
    return float(value) if value is not None else GATE_LR_FACTOR * float(cfg.trainer.base_lr)


# --------------------------------------------------------------------------------------------- callbacks
class GateL1Loss(TrainerCallback):
    """The official SoRA code's extra loss ``l1_lambda * mean(|g|)``: the sum of |g| over every gate entry of
    every layer divided by the number of entries (one global mean, not a mean of per-layer means)."""

    def __init__(self, l1_lambda: float) -> None:
        self.l1_lambda = float(l1_lambda)

    def extra_losses(self, trainer: Trainer, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gates, _ = split_gate_parameters(trainer.model)
        if not gates:
            return {}
        total = sum(g.numel() for g in gates)
        return {"gate_l1": self.l1_lambda * torch.stack([g.abs().sum() for g in gates]).sum() / total}


class SoraGates(TrainerCallback):
    """Sets each stage's ``sparse_lambda`` on the gate optimizer, logs ``gate_lr``/``sparse_lambda`` and adds
    ``gate_zero_ratio`` to every evaluation."""

    def __init__(self, sparse_lambda: float) -> None:
        self.sparse_lambda = float(sparse_lambda)

    def stage_lambda(self, stage: Stage) -> float:
        return float(stage.params.get("sparse_lambda", self.sparse_lambda))

    def on_stage_begin(self, trainer: Trainer, stage: Stage) -> None:
        set_sparse_lambda(trainer.optimizers.get("gate"), self.stage_lambda(stage))

    def log_values(self, trainer: Trainer) -> dict[str, float]:
        gate_opt = trainer.optimizers.get("gate")
        if gate_opt is None:
            return {}
        group = gate_opt.param_groups[0]
        return {"gate_lr": group["lr"], "sparse_lambda": group["sparse_lambda"]}

    def eval_metrics(self, trainer: Trainer) -> dict[str, float]:
        from adapters import summarize_gate_sparsity

        return {"gate_zero_ratio": float(summarize_gate_sparsity(trainer.model))}


# --------------------------------------------------------------------------------------------- plug-in
class SoraMethod(Method):
    name = "sora"
    schema = SoraSchema
    layer_keys = {"use_rslora": "use_rslora", "gate_init": "gate_init"}
    stage_params = ("sparse_lambda",)

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        adapter = cfg.adapter
        require(adapter.gate_lr is None or adapter.gate_lr > 0,
                f"adapter.gate_lr must be null or > 0 (got {adapter.gate_lr})")
        if adapter.threshold_mode in RENAMED_MODES:
            raise UserError(RENAMED_MODES[adapter.threshold_mode])
        require(adapter.gate_init in ("ones", "randn"),
                f"adapter.gate_init must be ones or randn (got {adapter.gate_init!r})")
        require(adapter.threshold_mode in THRESHOLD_MODES,
                f"adapter.threshold_mode must be one of {', '.join(THRESHOLD_MODES)} (got {adapter.threshold_mode!r})")
        require(adapter.l1_lambda >= 0, f"adapter.l1_lambda must be >= 0 (got {adapter.l1_lambda})")
        require(0 <= adapter.gate_warmup_ratio <= 1,
                f"adapter.gate_warmup_ratio must be in [0, 1] (got {adapter.gate_warmup_ratio})")

    def warnings(self, cfg: DictConfig) -> list[str]:
        """A SoRA run whose gates are never thresholded (sparse_lambda 0 in every stage) is LoRA with a gate."""
        from trainers.methods.schedules import get_schedule

        stages = get_schedule(cfg.schedule.name).stages(cfg)
        lambdas = [float(s.params.get("sparse_lambda", cfg.sparse_lambda)) for s in stages]
        if all(lam == 0 for lam in lambdas):
            return ["adapter=sora with sparse_lambda=0: no gate is ever thresholded, so this run is plain LoRA with "
                    "a trainable gate; set sparse_lambda > 0 (e.g. sparse_lambda=0.4) to prune ranks"]
        return []

    def optimizers(self, model: nn.Module, cfg: DictConfig) -> list[OptimizerSpec]:
        tcfg, adapter = cfg.trainer, cfg.adapter
        gates, base = split_gate_parameters(model)
        if not base:
            raise ValueError("the model has no trainable parameters besides gates; was an adapter applied?")
        betas = (float(tcfg.betas[0]), float(tcfg.betas[1]))

        def gate_optimizer(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return make_gate_optimizer(groups, resolve_gate_lr(cfg), betas, float(cfg.sparse_lambda),
                                       str(adapter.threshold_mode), str(tcfg.optimizer_impl))

        build = adamw(tcfg.base_lr, betas, tcfg.weight_decay, tcfg.optimizer_impl)
        return [OptimizerSpec("base", [{"params": base}], build, float(tcfg.warmup_ratio)),
                OptimizerSpec("gate", [{"params": gates}], gate_optimizer, float(adapter.gate_warmup_ratio))]

    def grad_components(self, cfg: DictConfig) -> dict[str, str]:
        return {**super().grad_components(cfg), "gate": r"(^|\.)gate$"}

    def callbacks(self, cfg: DictConfig) -> list[TrainerCallback]:
        from trainers.methods.sora_report import SoraFinish, SoraStageReport

        hooks: list[TrainerCallback] = [SoraGates(float(cfg.sparse_lambda))]
        if cfg.adapter.l1_lambda > 0:
            hooks.append(GateL1Loss(cfg.adapter.l1_lambda))
        return hooks + [SoraStageReport(float(cfg.sparse_lambda)), SoraFinish()]


METHOD = SoraMethod()
