"""DoRA (Liu et al., 2024): ``y = (m / ||W + s B A||_row) (W x + s B A x) + b``; trained like LoRA.

``adapter.detach_norm`` (default true, as PEFT and the official code) treats the row norm as a constant in
the backward (paper, sec. 4.3); false makes it differentiable (the seed's lab, the paper's ablation).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING, DictConfig

from trainers.methods.base import LoraSchema, Method


@dataclass
class DoraSchema(LoraSchema):
    detach_norm: bool = MISSING


class DoraMethod(Method):
    name = "dora"
    schema = DoraSchema
    layer_keys = {"use_rslora": "use_rslora", "detach_norm": "detach_norm"}

    def grad_components(self, cfg: DictConfig) -> dict[str, str]:
        return {**super().grad_components(cfg), "magnitude": r"(^|\.)magnitude$"}


METHOD = DoraMethod()
