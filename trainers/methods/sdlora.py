"""SD-LoRA as a method plug-in (the faithful, gate-free continual baseline; ``adapter=sdlora``).

What it adds to a run: its config (:class:`SDLoraSchema`, ``conf/adapter/sdlora.yaml``: the official r = 10 on
query / value, no dropout, magnitudes starting at 0.8), its optimizer (SGD with momentum 0.9 and a cosine schedule
with a floor, as the official code, or AdamW), the first task's own epochs and learning rate
(``init_epochs`` / ``init_lr``), and between tasks: freezing and normalising the finished direction, opening a
new one and resetting the shared per-task magnitudes (``adapters.add_sdlora_task``). Every adapter is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn

from trainers.loop.optimizers import OptimizerSpec
from trainers.methods.base import LoraSchema, Method, adamw, require

log = logging.getLogger(__name__)
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "linear")


@dataclass
class SDLoraSchema(LoraSchema):
    magnitude_init: float = MISSING
    optimizer: str = MISSING
    lr: float | None = MISSING
    momentum: float = MISSING
    lr_schedule: str = MISSING
    min_lr_ratio: float = MISSING
    warmup_ratio: float | None = MISSING
    init_epochs: int | None = MISSING
    init_lr: float | None = MISSING


def cosine_with_floor(warmup_ratio: float, min_lr_ratio: float) -> Any:
    """A schedule builder: linear warmup over ``warmup_ratio`` of the stage, then half a cosine from the peak lr
    down to ``min_lr_ratio x`` the peak lr (transformers' ``get_cosine_with_min_lr_schedule_with_warmup``):
    lr(s) = lr_min + (lr_peak - lr_min) (1 + cos(pi p)) / 2 with p the fraction of the post-warmup steps done."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    def build(optimizer: torch.optim.Optimizer, num_steps: int) -> Any:
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, int(warmup_ratio * num_steps), num_steps,
                                                           min_lr_rate=float(min_lr_ratio))

    return build


class SDLoraMethod(Method):
    name = "sdlora"
    layer_keys = {"use_rslora": "use_rslora", "magnitude_init": "magnitude_init"}
    schema = SDLoraSchema

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        adapter = cfg.adapter
        require(adapter.magnitude_init > 0, f"adapter.magnitude_init must be > 0 (got {adapter.magnitude_init})")
        require(adapter.optimizer in OPTIMIZERS,
                f"adapter.optimizer must be one of {', '.join(OPTIMIZERS)} (got {adapter.optimizer!r})")
        require(adapter.lr_schedule in LR_SCHEDULES,
                f"adapter.lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {adapter.lr_schedule!r})")
        require(0.0 <= adapter.momentum < 1.0, f"adapter.momentum must be in [0, 1) (got {adapter.momentum})")
        require(0.0 <= adapter.min_lr_ratio <= 1.0,
                f"adapter.min_lr_ratio must be in [0, 1] (got {adapter.min_lr_ratio})")
        require(adapter.warmup_ratio is None or 0.0 <= adapter.warmup_ratio < 1.0,
                f"adapter.warmup_ratio must be null or in [0, 1) (got {adapter.warmup_ratio})")
        require(adapter.init_epochs is None or adapter.init_epochs > 0,
                f"adapter.init_epochs must be null or > 0 (got {adapter.init_epochs})")
        require(adapter.lr is None or adapter.lr > 0, f"adapter.lr must be null or > 0 (got {adapter.lr})")
        require(adapter.init_lr is None or adapter.init_lr > 0,
                f"adapter.init_lr must be null or > 0 (got {adapter.init_lr})")

    def warnings(self, cfg: DictConfig) -> list[str]:
        found = super().warnings(cfg)
        if cfg.adapter.use_rslora:
            found.append("adapter.use_rslora has no effect for sdlora: its directions are scaled by magnitudes only")
        return found

    # -- training ------------------------------------------------------------------------------------
    def optimizers(self, model: nn.Module, cfg: DictConfig) -> list[OptimizerSpec]:
        """One optimizer over every trainable parameter: SGD (momentum ``adapter.momentum``, no weight decay, as
        the official code) or AdamW (``trainer.betas`` / ``trainer.weight_decay``), peak lr ``adapter.lr`` (null:
        ``trainer.base_lr``), with a cosine-with-floor (or the linear) schedule."""
        tcfg, adapter = cfg.trainer, cfg.adapter
        params = [p for p in model.parameters() if p.requires_grad]
        peak = float(tcfg.base_lr if adapter.lr is None else adapter.lr)
        warmup = float(tcfg.warmup_ratio if adapter.warmup_ratio is None else adapter.warmup_ratio)
        if adapter.optimizer == "sgd":
            momentum = float(adapter.momentum)

            def build(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
                return torch.optim.SGD(groups, lr=peak, momentum=momentum)
        else:
            build = adamw(peak, tcfg.betas, tcfg.weight_decay, tcfg.optimizer_impl)
        schedule = cosine_with_floor(warmup, adapter.min_lr_ratio) if adapter.lr_schedule == "cosine" else None
        return [OptimizerSpec("base", [{"params": params}], build, warmup, schedule)]

    def task_config(self, cfg: DictConfig, task: int) -> DictConfig:
        """Task 0 trains ``adapter.init_epochs`` epochs at peak lr ``adapter.init_lr`` (each null: as the others)."""
        adapter = cfg.adapter
        if task != 0 or (adapter.init_epochs is None and adapter.init_lr is None):
            return cfg
        changes: dict[str, Any] = {}
        if adapter.init_epochs is not None:
            changes["trainer"] = {"epochs": int(adapter.init_epochs)}
        if adapter.init_lr is not None:
            changes["adapter"] = {"lr": float(adapter.init_lr)}
        return OmegaConf.merge(cfg, changes)

    # -- continual learning --------------------------------------------------------------------------
    def begin_task(self, model: nn.Module, task: int) -> None:
        from adapters import add_sdlora_task

        add_sdlora_task(model)

    def end_task(self, model: nn.Module, task: int, cfg: DictConfig, run_dir: Path, main: bool) -> dict[str, Any]:
        """Every adapter is kept; the task record holds the shared magnitudes the task ended with."""
        from adapters import sdlora_magnitudes

        magnitudes = sdlora_magnitudes(model)
        if main:
            log.info("[SD-LoRA] Task %d - magnitudes: [%s]", task, " ".join(f"{m:.4f}" for m in magnitudes))
        return {"magnitudes": magnitudes}

    def adapters_kept(self, model: nn.Module) -> tuple[int, int]:
        from adapters import sdlora_magnitudes

        tasks = len(sdlora_magnitudes(model))
        return tasks, tasks

    def continual_summary(self, model: nn.Module, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        return {"magnitudes": tasks[-1].get("magnitudes")}


METHOD = SDLoraMethod()
