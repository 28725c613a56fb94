"""LoRA-family adapter layers and the model-level API to inject, merge, prune and export them.

Knows nothing of training: the trainers use only what is exported here.
"""

from __future__ import annotations

from .base import AdapterLayer, adapter_layers, lora_scaling
from .decomposition import decomposition_change, magnitude_direction, weight_decomposition
from .dora import DoraLinear
from .dropout import DROPOUT_SHARING
from .export import export_peft, peft_task_type
from .full import FullLinear
from .gumbel import (
    GumbelLinear,
    add_gumbel_task,
    drop_zero_beta_tasks,
    entropy,
    gumbel_active_tasks,
    gumbel_betas,
    gumbel_contributions,
    gumbel_sparsemax,
    gumbel_sparsity_loss,
    prune_gumbel_task,
    set_gumbel_tau,
)
from .inject import ADAPTERS, HEAD_NAMES, find_head, find_targets, wrap_linears
from .lora import LoraEmbedding, LoraLinear
from .model_ops import (
    adapter_state_dict,
    count_trainable_parameters,
    load_adapter_state_dict,
    lora_direction_parameters,
    merge_model,
    unmerge_model,
)
from .sdlora import SDLoraLinear, SharedMagnitudes, add_sdlora_task, sdlora_magnitudes
from .sora import (
    SoraLinear,
    effective_ranks,
    is_gate_parameter,
    merge_sora_model,
    prune_sora_model,
    summarize_gate_sparsity,
)

__all__ = [
    "ADAPTERS",
    "DROPOUT_SHARING",
    "HEAD_NAMES",
    "AdapterLayer",
    "DoraLinear",
    "FullLinear",
    "GumbelLinear",
    "LoraEmbedding",
    "LoraLinear",
    "SDLoraLinear",
    "SharedMagnitudes",
    "SoraLinear",
    "adapter_layers",
    "adapter_state_dict",
    "add_gumbel_task",
    "add_sdlora_task",
    "count_trainable_parameters",
    "drop_zero_beta_tasks",
    "decomposition_change",
    "effective_ranks",
    "entropy",
    "export_peft",
    "peft_task_type",
    "find_head",
    "find_targets",
    "gumbel_active_tasks",
    "gumbel_betas",
    "gumbel_contributions",
    "gumbel_sparsemax",
    "gumbel_sparsity_loss",
    "is_gate_parameter",
    "load_adapter_state_dict",
    "lora_direction_parameters",
    "lora_scaling",
    "magnitude_direction",
    "merge_model",
    "merge_sora_model",
    "prune_gumbel_task",
    "prune_sora_model",
    "sdlora_magnitudes",
    "set_gumbel_tau",
    "summarize_gate_sparsity",
    "unmerge_model",
    "weight_decomposition",
    "wrap_linears",
]
