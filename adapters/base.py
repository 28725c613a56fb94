"""The shared base of every adapter layer.

An adapter layer wraps an existing ``nn.Linear`` (``base_layer``) in place, freezes it, and adds a
trainable low-rank branch. Shapes follow PEFT: ``lora_A`` is (r, in_features), ``lora_B`` is
(out_features, r), and the branch is scaled by ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rsLoRA). The branch always computes ``(dropout(x) @ A.T) @ B.T`` and never the (out, in) product B @ A.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) for rank-stabilised LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def validate_hyperparameters(r: int, lora_alpha: float, lora_dropout: float) -> None:
    """Raise ValueError with one clear line for out-of-range adapter hyperparameters."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


class AdapterLayer(nn.Module):
    """Base class: holds the frozen base layer, the rank, the scaling and the input dropout.

    Subclasses create their trainable tensors in ``__init__`` and implement ``forward``,
    ``delta_weight`` (the dense update the layer adds to W) and, where it exists, exact merging.
    """

    adapter_name: str = "base"

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        validate_hyperparameters(r, lora_alpha, lora_dropout)
        self.base_layer = base_layer
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(self.lora_alpha, r, use_rslora)
        self.lora_dropout_p = float(lora_dropout)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False

    # -- hyperparameters that may change during training ------------------------------------
    def set_lora_alpha(self, lora_alpha: float) -> None:
        """Change lora_alpha (e.g. alpha doubling); the scaling follows in place."""
        if self.merged:
            raise RuntimeError("cannot change lora_alpha of a merged adapter; unmerge it first")
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
        ratio = self.scaling / lora_scaling(self.lora_alpha, self.r, self.use_rslora)
        self.lora_alpha = float(lora_alpha)
        self.scaling = ratio * lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    # -- helpers --------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (so code that reads ``layer.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def dropout_is_identity(self) -> bool:
        """True when the branch sees exactly the input x (no dropout active)."""
        return isinstance(self.lora_dropout, nn.Identity) or not self.training

    def delta_weight(self) -> torch.Tensor:
        """The dense (out, in) update this adapter adds to the base weight."""
        raise NotImplementedError

    def merge(self) -> None:
        """Fold the update into the frozen weight: W <- W + delta (additive adapters)."""
        if not self.merged:
            self._add_to_weight(self.delta_weight().detach())
            self.merged = True

    def unmerge(self) -> None:
        """Undo ``merge``: W <- W - delta."""
        if self.merged:
            self._add_to_weight(-self.delta_weight().detach())
            self.merged = False

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.add_(delta.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


class LowRankLinear(AdapterLayer):
    """An adapter on ``nn.Linear`` with one (A, B) pair: A kaiming-uniform(a=sqrt 5), B zeros."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"{type(self).__name__} wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
