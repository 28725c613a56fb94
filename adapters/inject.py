"""Injecting adapters into a model: target matching and in-place replacement of layers."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn

from .base import AdapterLayer, replace_submodule
from .dora import DoraLinear
from .dropout import DROPOUT_SHARING, install_dropout_sharing
from .full import FullLinear
from .gumbel import GumbelLinear
from .lora import LoraEmbedding, LoraLinear
from .sdlora import SDLoraLinear
from .sora import SoraLinear

ADAPTERS: dict[str, type[AdapterLayer]] = {
    "lora": LoraLinear,
    "dora": DoraLinear,
    "sora": SoraLinear,
    "gumbel": GumbelLinear,
    "sdlora": SDLoraLinear,
    "full": FullLinear,
}
# Module names that mark a task head: "all-linear" leaves them alone (they are trained in full
# through ``modules_to_save`` instead), as PEFT does for the output layer.
SAVED_ATTR = "adapter_modules_to_save"  # model attribute listing the fully trained modules
# The first entry found as a model attribute is the model's output head (see ``find_head``).
HEAD_NAMES = ("classifier", "score", "lm_head", "head", "heads", "cls")


def _inside_adapter(name: str, adapter_names: Iterable[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in adapter_names)


def _is_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return module is output or any(part in HEAD_NAMES for part in name.split("."))


def _matches(name: str, target: str) -> bool:
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def find_targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the modules selected by ``target_modules``, in model order.

    Each target is an exact module name, a name suffix on a dot boundary (``"query"``,
    ``"attention.output.dense"``), a regular expression matched against the whole name, or
    ``"all-linear"`` (every ``nn.Linear`` outside the task head). Raises ``ValueError`` naming the
    closest module names when a target matches nothing, and when a match is already adapted.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty: name at least one module, a regex, or 'all-linear'")
    modules = dict(model.named_modules())
    adapter_names = [n for n, m in modules.items() if isinstance(m, AdapterLayer)]
    candidates = {n: m for n, m in modules.items() if n and not _inside_adapter(n, adapter_names)}
    selected: dict[str, None] = {}
    for target in targets:
        if target == "all-linear":
            hits = [
                n for n, m in candidates.items() if type(m) is nn.Linear and not _is_head(model, n, m)
            ]
            if not hits:
                raise ValueError("target 'all-linear' matched no nn.Linear outside the task head")
        else:
            hits = [n for n in candidates if _matches(n, target)]
            if not hits:
                names = list(candidates) + sorted({n.rsplit(".", 1)[-1] for n in candidates})
                close = difflib.get_close_matches(target, names, n=5, cutoff=0.5)
                hint = f"; closest module names: {', '.join(close)}" if close else ""
                raise ValueError(f"target {target!r} matches no module in {type(model).__name__}{hint}")
        for name in hits:
            selected[name] = None
    for name in selected:
        if isinstance(candidates[name], AdapterLayer):
            raise ValueError(f"module {name!r} is already wrapped by {type(candidates[name]).__name__}")
    return list(selected)


def find_head(model: nn.Module) -> nn.Module:
    """The model's task head: the first attribute named in :data:`HEAD_NAMES` (``classifier``, ``score``, ...).
    ValueError when there is none."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no head named {' or '.join(HEAD_NAMES)}")


def make_adapter_layer(
    module: nn.Module,
    adapter: str,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    **adapter_kwargs,
) -> AdapterLayer:
    """Build the adapter layer of kind ``adapter`` around ``module``."""
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; choose one of {', '.join(ADAPTERS)}")
    if isinstance(module, nn.Embedding):
        if adapter != "lora":
            raise ValueError(f"adapter {adapter!r} supports nn.Linear only; embeddings take adapter='lora'")
        return LoraEmbedding(module, r, lora_alpha, lora_dropout, **adapter_kwargs)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"cannot adapt a {type(module).__name__}: adapters wrap nn.Linear (or nn.Embedding)")
    return ADAPTERS[adapter](module, r, lora_alpha, lora_dropout, **adapter_kwargs)


def wrap_linears(
    model: nn.Module,
    target_modules: str | Iterable[str],
    adapter: str = "lora",
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    modules_to_save: Iterable[str] | None = None,
    dropout_sharing: str = "shared",
    **adapter_kwargs,
) -> list[str]:
    """Replace the targeted layers of ``model`` in place by adapter layers; freeze everything else.

    ``modules_to_save`` names modules (e.g. the task head ``"classifier"``) that stay fully
    trainable and are exported with the adapter. ``dropout_sharing``: ``"shared"`` (layers reading the same
    input tensor in one forward pass share one dropout mask; each layer's mask keeps PEFT's distribution) or
    ``"independent"`` (one ``nn.Dropout`` per layer, exactly PEFT's); see :mod:`adapters.dropout`.
    Returns the names of the wrapped modules. Raises ``ValueError`` for an unknown adapter or
    ``dropout_sharing``, r <= 0, a target that matches nothing, a match that is not a Linear/Embedding,
    or a layer that is already wrapped.
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; choose one of {', '.join(ADAPTERS)}")
    if dropout_sharing not in DROPOUT_SHARING:
        raise ValueError(f"dropout_sharing must be one of {', '.join(DROPOUT_SHARING)}, got {dropout_sharing!r}")
    names = find_targets(model, target_modules)
    to_save = find_modules_to_save(model, modules_to_save)
    layers = {}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    for name in names:  # build all first so a bad match leaves the model untouched
        try:
            layers[name] = make_adapter_layer(
                model.get_submodule(name), adapter, r, lora_alpha, lora_dropout, **adapter_kwargs
            )
        except ValueError as err:
            for param, flag in requires_grad.items():  # layer constructors freeze their base
                param.requires_grad_(flag)
            raise ValueError(f"module {name!r}: {err}") from None
    for param in model.parameters():
        param.requires_grad_(False)
    for name, layer in layers.items():
        replace_submodule(model, name, layer)
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for pname, param in module.named_parameters():
                own = not pname.startswith("base_layer.") or module.trains_base
                if own and not module.is_frozen_direction(pname):
                    param.requires_grad_(True)
    by_kind: dict[type[AdapterLayer], list[AdapterLayer]] = {}
    for layer in layers.values():
        by_kind.setdefault(type(layer), []).append(layer)
    for kind, kind_layers in by_kind.items():  # tensors a method shares between layers, registered once
        kind.setup_shared(model, kind_layers)
    install_dropout_sharing(model, list(layers.values()), dropout_sharing)
    saved = set(getattr(model, SAVED_ATTR, [])) | set(to_save)
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    setattr(model, SAVED_ATTR, sorted(saved))
    return names


def find_modules_to_save(model: nn.Module, modules_to_save: Iterable[str] | None) -> list[str]:
    """Resolve ``modules_to_save`` (exact names or suffixes) to module names; error if one is missing."""
    found: list[str] = []
    for target in modules_to_save or []:
        hits = [n for n, _ in model.named_modules() if n and (n == target or n.endswith("." + target))]
        if not hits:
            raise ValueError(f"modules_to_save entry {target!r} matches no module in {type(model).__name__}")
        found.extend(h for h in hits if not any(h.startswith(f + ".") for f in hits if f != h))
    return found
