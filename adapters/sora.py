"""SoRA (Ding et al., 2023): LoRA with a sparse gate between A and B.

    y = W x + b + s * B (g ⊙ (A dropout(x))),      g: (r,)

The gate g is trained by its own proximal optimizer (soft-thresholding drives entries to exactly
zero; see ``trainers.methods.sora``). A rank whose gate is 0 contributes nothing, so ``prune`` drops it:
A keeps the rows and B the columns of the surviving ranks, g is folded into B and reset to ones,
and the outputs are unchanged while the stored rank shrinks. The scaling s is kept as it was.

gate_init: "ones" (the seed's behaviour, default) or "randn" (the official SoRA code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LowRankLinear, adapter_layers, low_rank_linear, replace_submodule

GATE_INITS = ("ones", "randn")


class SoraLinear(LowRankLinear):
    """y = W x + b + s * B (g ⊙ A dropout(x))."""

    adapter_name = "sora"

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        gate_init: str = "ones",
    ) -> None:
        if gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {GATE_INITS}, got {gate_init!r}")
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        init = torch.ones if gate_init == "ones" else torch.randn
        self.gate = nn.Parameter(init(r, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        x_d = self.dropout_input(x)
        if self.use_fused(x):
            return low_rank_linear(x, self.base_layer, self.lora_A, self.lora_B, self.scaling, self.gate, x_d)
        hidden = F.linear(x_d, self.lora_A) * (self.gate * self.scaling)
        return self.base_layer(x) + F.linear(hidden, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B * (self.gate * self.scaling)) @ self.lora_A

    def peft_tensors(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Plain LoRA factors: zero-gated ranks dropped, the gate folded into B."""
        keep = (self.gate != 0).nonzero().flatten()
        a, b = self.lora_A.detach()[keep], self.lora_B.detach()[:, keep] * self.gate.detach()[keep]
        return int(keep.numel()), {"lora_A.weight": a, "lora_B.weight": b}

    def effective_rank(self) -> int:
        """Number of ranks whose gate is not exactly zero."""
        return int((self.gate != 0).sum())

    @torch.no_grad()
    def prune(self) -> None:
        """Drop the ranks with g == 0 and fold g into B; outputs are unchanged."""
        if self.merged:
            raise RuntimeError("cannot prune a merged SoRA layer; unmerge it first")
        keep = (self.gate != 0).nonzero().flatten()
        scale_before = self.scaling
        self.lora_A = nn.Parameter(self.lora_A[keep].clone())
        self.lora_B = nn.Parameter((self.lora_B[:, keep] * self.gate[keep]).clone())
        self.gate = nn.Parameter(torch.ones_like(self.gate[keep]))
        self.r = int(keep.numel())
        self.scaling = scale_before


# -- model-level operations on every SoRA layer ------------------------------------------------
def is_gate_parameter(name: str) -> bool:
    """SoRA gates are the parameters named ``*.gate`` (one ``(r,)`` vector per SoraLinear)."""
    return name == "gate" or name.endswith(".gate")


def prune_sora_model(model: nn.Module) -> dict[str, int]:
    """Drop the zero-gated ranks of every SoRA layer (outputs unchanged); returns name -> new rank."""
    ranks = {}
    for name, layer in adapter_layers(model, SoraLinear).items():
        layer.prune()
        ranks[name] = layer.r
    return ranks


def merge_sora_model(model: nn.Module) -> None:
    """Fold every SoRA layer into its base weight and replace it by the plain ``nn.Linear``."""
    for name, layer in adapter_layers(model, SoraLinear).items():
        layer.merge()
        replace_submodule(model, name, layer.base_layer)


def summarize_gate_sparsity(model: nn.Module) -> float:
    """Fraction of SoRA gate entries that are exactly zero (0.0 when the model has no gates)."""
    gates = [layer.gate.detach() for layer in adapter_layers(model, SoraLinear).values()]
    total = sum(g.numel() for g in gates)
    return sum(int((g == 0).sum()) for g in gates) / total if total else 0.0


def effective_ranks(model: nn.Module) -> dict[str, int]:
    """Name -> number of non-zero gates, for every SoRA layer."""
    return {name: layer.effective_rank() for name, layer in adapter_layers(model, SoraLinear).items()}
