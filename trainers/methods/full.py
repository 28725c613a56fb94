"""Full fine-tuning of the target layers (``adapter=full``): the reference of the DoRA paper's analysis.

The targeted ``nn.Linear`` layers train their own weight and bias (``adapters.FullLinear``, the layer kind
``full``); everything else is frozen as for the adapters, the task head (``model.modules_to_save``) trains
in full as always. One AdamW over all of it, like LoRA. No rank, alpha or dropout: the config has only
``name`` and ``target_modules``. There is no PEFT format: ``adapter/`` holds ``adapter_state.safetensors``
(the trained weights of the targets and the head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from trainers.methods.base import Method, require
from trainers.models.loading import AdapterSpec


@dataclass
class FullSchema:
    name: str = MISSING
    target_modules: Any = MISSING


class FullMethod(Method):
    name = "full"
    layer = "full"
    schema = FullSchema
    layer_keys = {}

    def check(self, cfg: DictConfig) -> None:
        targets = cfg.adapter.target_modules
        require(isinstance(targets, str) or (OmegaConf.is_list(targets) and len(targets) > 0
                                             and all(isinstance(t, str) for t in targets)),
                f"adapter.target_modules must be a string or a non-empty list of strings (got {targets})")

    def adapter_spec(self, adapter_cfg: DictConfig) -> AdapterSpec:
        targets = adapter_cfg.target_modules
        targets = list(targets) if OmegaConf.is_list(targets) else targets
        return AdapterSpec(self.name, self.layer, 1, 1.0, 0.0, targets, {})

    def grad_components(self, cfg: DictConfig) -> dict[str, str]:
        return {"weight": r"(^|\.)base_layer\.(weight|bias)$"}


METHOD = FullMethod()
