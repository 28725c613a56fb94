"""Operations over every adapter layer of a model: merge, prune, sparsity, state dicts, counts."""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer
from .gumbel import GumbelLinear
from .inject import SAVED_ATTR, _set_submodule
from .sora import SoraLinear


def adapter_layers(model: nn.Module, kind: type[AdapterLayer] = AdapterLayer) -> dict[str, AdapterLayer]:
    """Name -> layer for every adapter layer of the given kind in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def merge_model(model: nn.Module, unload: bool = False) -> None:
    """Merge every mergeable adapter into its base weight; with ``unload`` put the plain layer back."""
    for name, layer in adapter_layers(model).items():
        if isinstance(layer, GumbelLinear):
            raise ValueError(f"module {name!r}: Gumbel CL-LoRA layers are not merged (their gate is stochastic)")
        layer.merge()
        if unload:
            _set_submodule(model, name, layer.base_layer)


def unmerge_model(model: nn.Module) -> None:
    """Undo ``merge_model`` (without ``unload``) on every adapter layer."""
    for layer in adapter_layers(model).values():
        if not isinstance(layer, GumbelLinear):
            layer.unmerge()


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
        _set_submodule(model, name, layer.base_layer)


def summarize_gate_sparsity(model: nn.Module) -> float:
    """Fraction of SoRA gate entries that are exactly zero (0.0 when the model has no gates)."""
    gates = [layer.gate.detach() for layer in adapter_layers(model, SoraLinear).values()]
    total = sum(g.numel() for g in gates)
    return sum(int((g == 0).sum()) for g in gates) / total if total else 0.0


def effective_ranks(model: nn.Module) -> dict[str, int]:
    """Name -> number of non-zero gates, for every SoRA layer."""
    return {name: layer.effective_rank() for name, layer in adapter_layers(model, SoraLinear).items()}


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _adapter_keys(model: nn.Module) -> set[str]:
    keys = set()
    state_keys = model.state_dict(keep_vars=True).keys()
    prefixes = [name + "." for name in adapter_layers(model)]
    saved = [name + "." for name in getattr(model, SAVED_ATTR, [])]
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
