"""Operations over every adapter layer of a model: merge, state dicts, counts (method-specific ones live next
to their layer, e.g. ``adapters/sora.py``)."""

from __future__ import annotations

import torch
from torch import nn

from .base import SharedAdapterState, adapter_layers, replace_submodule
from .inject import SAVED_ATTR


def merge_model(model: nn.Module, unload: bool = False) -> None:
    """Merge every adapter into its base weight; with ``unload`` put the plain layer back. ValueError (before
    anything changes) when a layer cannot be merged."""
    layers = adapter_layers(model)
    for name, layer in layers.items():
        if not layer.mergeable:
            raise ValueError(f"module {name!r}: {type(layer).__name__} layers are not merged "
                             f"(e.g. Gumbel CL-LoRA: the gate is stochastic)")
    for name, layer in layers.items():
        layer.merge()
        if unload:
            replace_submodule(model, name, layer.base_layer)


def unmerge_model(model: nn.Module) -> None:
    """Undo ``merge_model`` (without ``unload``) on every adapter layer."""
    for layer in adapter_layers(model).values():
        if layer.mergeable:
            layer.unmerge()


def lora_direction_parameters(model: nn.Module) -> int:
    """Number of LoRA direction entries (A and B) the model keeps, summed over its adapter layers
    (for Gumbel layers only the active tasks' pairs)."""
    return sum(layer.direction_parameters() for layer in adapter_layers(model).values())


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _adapter_keys(model: nn.Module) -> set[str]:
    keys = set()
    state_keys = model.state_dict(keep_vars=True).keys()
    prefixes = [name + "." for name in adapter_layers(model)]
    saved = [name + "." for name in getattr(model, SAVED_ATTR, [])]
    saved += [name + "." for name, m in model.named_modules() if isinstance(m, SharedAdapterState)]
    for key in state_keys:
        in_adapter = any(key.startswith(p) and not key.startswith(p + "base_layer.") for p in prefixes)
        if in_adapter or any(key.startswith(p) for p in saved):
            keys.add(key)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return keys | trainable


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a checkpoint of an adapted model needs: adapter tensors (trainable or frozen, and
    their buffers), the modules in ``modules_to_save`` and any other trainable parameter."""
    keys = _adapter_keys(model)
    return {k: v.detach() for k, v in model.state_dict().items() if k in keys}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load the output of ``adapter_state_dict``; ValueError on missing, unexpected or mis-shaped keys."""
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[0]!r}")
        raise ValueError("adapter state does not match the model: " + "; ".join(parts))
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"adapter state does not match the model: {key!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=False)
