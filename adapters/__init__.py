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


def add_gumbel_task(model: nn.Module) -> int:
    """Freeze and normalise every Gumbel layer's current direction and open one for a new task.

    Returns the number of tasks per layer afterwards (0 when the model has no Gumbel layers).
    """
    layers = list(adapter_layers(model, GumbelLinear).values())
    for layer in layers:
        layer.add_task()
    return layers[0].num_tasks if layers else 0


def prune_gumbel_task(model: nn.Module, task: int) -> None:
    """Mask task ``task`` out of every Gumbel layer's gate (its beta becomes exactly 0)."""
    for layer in adapter_layers(model, GumbelLinear).values():
        layer.prune_task(task)


@torch.no_grad()
def gumbel_betas(model: nn.Module) -> torch.Tensor:
    """Deterministic (noise-free) gates of every Gumbel layer, stacked: shape (layers, tasks); (0, 0) if none."""
    layers = list(adapter_layers(model, GumbelLinear).values())
    if not layers:
        return torch.zeros(0, 0)
    return torch.stack([layer.beta(noise=False).detach().float().cpu() for layer in layers])


def gumbel_active_tasks(model: nn.Module) -> torch.Tensor:
    """Which tasks are active (not pruned), as a bool vector over tasks (from the first Gumbel layer)."""
    layers = list(adapter_layers(model, GumbelLinear).values())
    return layers[0].active.detach().cpu().clone() if layers else torch.zeros(0, dtype=torch.bool)


def lora_direction_parameters(model: nn.Module) -> int:
    """Number of LoRA direction entries (A and B) the model keeps: every LoRA-family layer's factors,
    and for Gumbel layers only those of active tasks (a pruned task's pair can be dropped)."""
    total = 0
    for layer in adapter_layers(model).values():
        if isinstance(layer, GumbelLinear):
            for t in layer.active.nonzero().flatten().tolist():
                total += layer.lora_A[t].numel() + layer.lora_B[t].numel()
        else:
            total += sum(p.numel() for n, p in layer.named_parameters(recurse=False) if n in ("lora_A", "lora_B"))
    return total


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
    "add_gumbel_task",
    "count_trainable_parameters",
    "effective_ranks",
    "entropy",
    "export_peft",
    "find_targets",
    "gumbel_active_tasks",
    "gumbel_betas",
    "gumbel_sparsemax",
    "gumbel_sparsity_loss",
    "load_adapter_state_dict",
    "lora_direction_parameters",
    "lora_scaling",
    "merge_model",
    "merge_sora_model",
    "prune_gumbel_task",
    "prune_sora_model",
    "set_gumbel_tau",
    "summarize_gate_sparsity",
    "unmerge_model",
    "wrap_linears",
]
