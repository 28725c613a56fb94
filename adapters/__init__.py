"""LoRA-family adapter layers and the model-level API to inject, merge, prune and export them.

Knows nothing of training: the trainers use only what is exported here.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer, lora_scaling
from .dora import DoraLinear
from .export import export_peft
from .gumbel import GumbelLinear, entropy, gumbel_sparsemax
from .inject import ADAPTERS, find_targets, wrap_linears
from .lora import LoraEmbedding, LoraLinear
from .model_ops import (
    adapter_layers,
    adapter_state_dict,
    count_trainable_parameters,
    effective_ranks,
    load_adapter_state_dict,
    merge_model,
    merge_sora_model,
    prune_sora_model,
    summarize_gate_sparsity,
    unmerge_model,
)
from .sora import SoraLinear


def set_gumbel_tau(model: nn.Module, tau: float) -> None:
    """Set the Gumbel-Sparsemax temperature of every Gumbel CL-LoRA layer."""
    for layer in adapter_layers(model, GumbelLinear).values():
        layer.tau = float(tau)


def gumbel_sparsity_loss(model: nn.Module) -> torch.Tensor:
    """Mean entropy of the task gates used in the last forward pass (0 without Gumbel layers)."""
    layers = list(adapter_layers(model, GumbelLinear).values())
    if not layers:
        return torch.zeros(())
    return torch.stack([layer.gate_entropy() for layer in layers]).mean()


__all__ = [
    "ADAPTERS",
    "AdapterLayer",
    "DoraLinear",
    "GumbelLinear",
    "LoraEmbedding",
    "LoraLinear",
    "SoraLinear",
    "adapter_layers",
    "adapter_state_dict",
    "count_trainable_parameters",
    "effective_ranks",
    "entropy",
    "export_peft",
    "find_targets",
    "gumbel_sparsemax",
    "gumbel_sparsity_loss",
    "load_adapter_state_dict",
    "lora_scaling",
    "merge_model",
    "merge_sora_model",
    "prune_sora_model",
    "set_gumbel_tau",
    "summarize_gate_sparsity",
    "unmerge_model",
    "wrap_linears",
]
