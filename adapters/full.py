"""Full fine-tuning of the targeted layers (``adapter="full"``): the reference the DoRA paper compares with.

The layer wraps an ``nn.Linear`` like every adapter, but instead of adding a branch it trains the wrapped
layer's own weight and bias (``trains_base``): ``y = W x + b`` with W and b trainable. The pretrained W_0 is
kept as a non-persistent buffer, so ``delta_weight = W - W_0`` and the weight-decomposition analysis have
their reference (and a checkpoint holds only the trained W and b). There is no PEFT format for it: the
export writes ``adapter_state.safetensors``; ``merge`` is a no-op (W already is the merged weight).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer


class FullLinear(AdapterLayer):
    """``y = W x + b`` with the base layer's W and b trained in full; r, lora_alpha and dropout are unused."""

    adapter_name = "full"
    trains_base = True
    peft_use_dora = None

    def __init__(self, base_layer: nn.Linear, r: int = 1, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"FullLinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer, r, lora_alpha, 0.0, use_rslora)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.register_buffer("weight_init", base_layer.weight.detach().clone(), persistent=False)
        base_layer.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def initial_weight(self) -> torch.Tensor:
        return self.weight_init

    def merged_weight(self) -> torch.Tensor:
        return self.base_layer.weight.detach()

    def delta_weight(self) -> torch.Tensor:
        """W - W_0: what training changed."""
        return self.base_layer.weight - self.weight_init

    def merge(self) -> None:
        self.merged = True  # the trained W is the layer's weight already

    def unmerge(self) -> None:
        self.merged = False

    def peft_tensors(self) -> tuple[int, dict[str, torch.Tensor]]:
        raise ValueError("full fine-tuning has no PEFT adapter format")

    def direction_parameters(self) -> int:
        return 0

    def extra_repr(self) -> str:
        return f"full fine-tuning of {self.out_features}x{self.in_features}"
