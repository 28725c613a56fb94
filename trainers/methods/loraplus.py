"""LoRA+ (Hayou et al., 2024): LoRA whose B matrices learn ``loraplus_lr_ratio`` times faster than the rest.

The layer is plain LoRA (``y = W x + b + s * B A dropout(x)``, exported as PEFT LoRA); only the optimizer
differs. One AdamW with two parameter groups:

    lora_B (every adapter's B, embeddings' too)   lr = trainer.base_lr * loraplus_lr_ratio
    everything else trainable (A, the task head)  lr = trainer.base_lr

both with ``trainer.weight_decay`` and the run's warmup schedule (which scales both groups alike, so the
ratio holds at every step). PEFT's ``create_loraplus_optimizer`` also moves 1-D parameters (biases) into
the fast group and gives embedding adapters their own lr; this plug-in follows the paper's rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig
from torch import nn

from trainers.loop.optimizers import OptimizerSpec
from trainers.methods.base import LoraSchema, Method, adamw, require


@dataclass
class LoraPlusSchema(LoraSchema):
    loraplus_lr_ratio: float = MISSING


def is_lora_b(name: str) -> bool:
    """The B factor of an adapter layer (``*.lora_B``)."""
    return name.rsplit(".", 1)[-1] == "lora_B"


class LoraPlusMethod(Method):
    name = "loraplus"
    layer = "lora"
    schema = LoraPlusSchema

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        ratio = cfg.adapter.loraplus_lr_ratio
        require(ratio > 0, f"adapter.loraplus_lr_ratio must be > 0 (got {ratio})")

    def optimizers(self, model: nn.Module, cfg: DictConfig) -> list[OptimizerSpec]:
        tcfg = cfg.trainer
        slow, fast = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (fast if is_lora_b(name) else slow).append(param)
        groups: list[dict[str, Any]] = [
            {"params": slow},
            {"params": fast, "lr": float(tcfg.base_lr) * float(cfg.adapter.loraplus_lr_ratio)},
        ]
        return [OptimizerSpec("base", groups, adamw(tcfg.base_lr, tcfg.betas, tcfg.weight_decay, tcfg.optimizer_impl),
                              float(tcfg.warmup_ratio))]


METHOD = LoraPlusMethod()
