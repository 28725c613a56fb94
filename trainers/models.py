"""Models and tokenizers (embedded package, local folder, Hub, or random from a config) and adapter injection."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from trainers.errors import UserError, first_line

PACKAGE_PREFIX = "package:"
# Adapter config keys handed to adapters.wrap_linears (beyond r, lora_alpha, lora_dropout, target_modules);
# the other keys (gate_lr, tau_*, ...) are used by the trainer and the adapter hooks.
WRAP_KWARGS: dict[str, dict[str, str]] = {
    "lora": {"use_rslora": "use_rslora"},
    "dora": {"use_rslora": "use_rslora"},
    "sora": {"use_rslora": "use_rslora", "gate_init": "gate_init"},
    "gumbel": {"use_rslora": "use_rslora", "tau_init": "tau"},
}


def resolve_source(ref: str) -> str:
    """``package:<pkg>`` -> the ``model/`` folder inside that installed package; anything else unchanged."""
    if not ref.startswith(PACKAGE_PREFIX):
        return ref
    package = ref[len(PACKAGE_PREFIX):]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model package {package!r} is not installed (pip install {package.replace('_', '-')})")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise UserError(f"package {package!r} has no model/config.json at {folder}")
    return str(folder)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_error(what: str, ref: str, exc: Exception) -> UserError:
    return UserError(f"cannot load {what} {ref!r} ({first_line(exc)}); Hub models need network access or a local copy "
                     f"(set model.pretrained to a folder)")


def load_tokenizer(model_cfg: Any) -> Any:
    """The tokenizer named by ``model.tokenizer`` (or ``model.pretrained`` when that is null)."""
    from transformers import AutoTokenizer

    ref = model_cfg.tokenizer or model_cfg.pretrained
    if ref is None:
        raise UserError(f"model {model_cfg.name!r} sets neither model.tokenizer nor model.pretrained")
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(resolve_source(ref))
    except UserError:
        raise
    except Exception as exc:
        raise _load_error("tokenizer", ref, exc) from None


def load_classifier(model_cfg: Any, num_labels: int) -> nn.Module:
    """A sequence classifier with a fresh ``num_labels`` head: pretrained, or random from ``model.config``.
    ``model.modality: image`` loads an image classifier (e.g. ViT) instead."""
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if model_cfg.get("modality", "text") == "image" else None

    with _quiet_transformers():
        if model_cfg.pretrained is None:
            if not model_cfg.config:
                raise UserError(f"model {model_cfg.name!r} needs model.pretrained or model.config")
            kwargs = OmegaConf.to_container(model_cfg.config, resolve=True)
            model_type = kwargs.pop("model_type", None)
            if model_type is None:
                raise UserError("model.config needs a model_type (e.g. bert)")
            try:
                config = AutoConfig.for_model(model_type, num_labels=num_labels, **kwargs)
            except Exception as exc:
                raise UserError(f"bad model.config: {exc}") from None
            return (auto or AutoModelForSequenceClassification).from_config(config)
        ref = model_cfg.pretrained
        try:
            return (auto or AutoModelForSequenceClassification).from_pretrained(
                resolve_source(ref), num_labels=num_labels, **({"ignore_mismatched_sizes": True} if auto else {}))
        except UserError:
            raise
        except Exception as exc:
            raise _load_error("model", ref, exc) from None


def apply_adapter(model: nn.Module, adapter_cfg: Any, modules_to_save: list[str] | None) -> list[str]:
    """Wrap the targeted linears with the configured adapter; returns the wrapped module names."""
    from adapters import wrap_linears

    targets = adapter_cfg.target_modules
    if OmegaConf.is_list(targets):
        targets = list(targets)
    extra = {dst: adapter_cfg[src] for src, dst in WRAP_KWARGS.get(adapter_cfg.name, {}).items() if src in adapter_cfg}
    try:
        return wrap_linears(model, targets, adapter=adapter_cfg.name, r=adapter_cfg.r,
                            lora_alpha=adapter_cfg.lora_alpha, lora_dropout=adapter_cfg.lora_dropout,
                            modules_to_save=list(modules_to_save or []), **extra)
    except ValueError as exc:
        raise UserError(f"adapter {adapter_cfg.name}: {exc}") from None


def build_model(model_cfg: Any, adapter_cfg: Any, num_labels: int) -> tuple[nn.Module, list[str]]:
    """Load the model and inject the adapter; returns ``(model, wrapped module names)``."""
    model = load_classifier(model_cfg, num_labels)
    wrapped = apply_adapter(model, adapter_cfg, list(model_cfg.modules_to_save or []))
    return model, wrapped
