"""Models and tokenizers (embedded package, local folder, Hub, or random from a config) and adapter injection.

Which adapter layer is injected, and with which keyword arguments, is decided by the method plug-in
(``trainers.methods``) and handed in as an :class:`AdapterSpec`; this module knows no method.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from trainers.core.errors import UserError, first_line

log = logging.getLogger(__name__)
PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class AdapterSpec:
    """What to inject: ``adapters.wrap_linears(model, target_modules, adapter=layer, r=..., **layer_kwargs)``.

    ``name`` is the method's name (``adapter.name``), used in messages; ``layer`` the adapter layer kind
    (LoRA+ trains a plain ``lora`` layer, for example).
    """

    name: str
    layer: str
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: str | list[str]
    layer_kwargs: dict[str, Any] = field(default_factory=dict)


def resolve_source(ref: str, gguf_file: str | None = None) -> str:
    """``package:<pkg>`` -> the ``model/`` folder inside that installed package (with ``gguf_file``: the package
    folder holding that file; the package is located with find_spec, never imported); anything else unchanged."""
    if not ref.startswith(PACKAGE_PREFIX):
        return ref
    package = ref[len(PACKAGE_PREFIX):]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model package {package!r} is not installed (pip install {package.replace('_', '-')})")
    if gguf_file:
        folder = Path(next(iter(spec.submodule_search_locations)))
        if not (folder / gguf_file).is_file():
            raise UserError(f"package {package!r} has no {gguf_file} at {folder}")
        return str(folder)
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
    gguf = _gguf_kwargs(model_cfg, ref)
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(resolve_source(ref, gguf.get("gguf_file")), **gguf)
    except UserError:
        raise
    except Exception as exc:
        raise _load_error("tokenizer", ref, exc) from None


def _gguf_kwargs(model_cfg: Any, ref: str) -> dict[str, str]:
    """``{"gguf_file": model.gguf_file}`` for ``ref`` (a package, Hub id or folder), except for a local folder
    that does not hold that file (e.g. a tokenizer saved with save_pretrained)."""
    gguf_file = model_cfg.get("gguf_file")
    if not gguf_file or (Path(ref).is_dir() and not (Path(ref) / gguf_file).is_file()):
        return {}
    return {"gguf_file": str(gguf_file)}


def random_model_config(model_cfg: Any, **overrides: Any) -> Any:
    """The transformers config of a random model: ``AutoConfig.for_model(**model.config, **overrides)``."""
    from transformers import AutoConfig

    if not model_cfg.config:
        raise UserError(f"model {model_cfg.name!r} needs model.pretrained or model.config")
    kwargs = OmegaConf.to_container(model_cfg.config, resolve=True)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise UserError("model.config needs a model_type (e.g. bert, llama or vit)")
    try:
        return AutoConfig.for_model(model_type, **overrides, **kwargs)
    except Exception as exc:
        raise UserError(f"bad model.config: {first_line(exc)}") from None


def load_classifier(model_cfg: Any, num_labels: int) -> nn.Module:
    """A sequence classifier with a fresh ``num_labels`` head: pretrained, or random from ``model.config``.
    ``model.modality: image`` loads an image classifier (e.g. ViT) instead."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    image = model_cfg.get("modality", "text") == "image"
    auto = AutoModelForImageClassification if image else AutoModelForSequenceClassification

    with _quiet_transformers():
        if model_cfg.pretrained is None:
            return auto.from_config(random_model_config(model_cfg, num_labels=num_labels))
        ref = model_cfg.pretrained
        if _gguf_kwargs(model_cfg, ref):  # transformers reads a GGUF file as the causal LM it holds
            raise UserError(f"model {model_cfg.name} is a causal LM (the GGUF file {model_cfg.gguf_file}) and this "
                            f"dataset is a classification task; use a causal-LM dataset (dataset=english_quotes) or "
                            f"a classification model (e.g. model=minilm)")
        try:
            return auto.from_pretrained(resolve_source(ref), num_labels=num_labels,
                                        **({"ignore_mismatched_sizes": True} if image else {}))
        except UserError:
            raise
        except Exception as exc:
            raise _load_error("model", ref, exc) from None


def apply_adapter(model: nn.Module, spec: AdapterSpec, modules_to_save: list[str] | None) -> list[str]:
    """Wrap the targeted linears as ``spec`` says; returns the wrapped module names."""
    from adapters import wrap_linears

    try:
        return wrap_linears(model, spec.target_modules, adapter=spec.layer, r=spec.r, lora_alpha=spec.lora_alpha,
                            lora_dropout=spec.lora_dropout, modules_to_save=list(modules_to_save or []),
                            **spec.layer_kwargs)
    except ValueError as exc:
        raise UserError(f"adapter {spec.name}: {exc}") from None


def fast_model_dropout(model: nn.Module, model_cfg: Any) -> None:
    """With ``model.fast_dropout`` (default true) the model's own ``nn.Dropout`` modules draw their masks with
    the adapters' faster generator (same distribution, another random stream); called before injection, so
    adapter layers keep the dropout ``adapter.dropout_sharing`` gives them."""
    if model_cfg.get("fast_dropout", True):
        from adapters.dropout import use_fast_dropout

        log.debug("fast dropout in %d of the model's dropout modules", use_fast_dropout(model))


def build_model(model_cfg: Any, spec: AdapterSpec, num_labels: int) -> tuple[nn.Module, list[str]]:
    """Load the classifier and inject the adapter; returns ``(model, wrapped module names)``."""
    model = load_classifier(model_cfg, num_labels)
    fast_model_dropout(model, model_cfg)
    wrapped = apply_adapter(model, spec, list(model_cfg.modules_to_save or []))
    return model, wrapped


def load_causal_lm(model_cfg: Any) -> nn.Module:
    """A causal LM: pretrained (a folder, a Hub id, or a GGUF file dequantised to float32), or random from
    ``model.config``. Loading a GGUF file takes about 30 s (it is dequantised tensor by tensor)."""
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        if model_cfg.pretrained is None:
            return AutoModelForCausalLM.from_config(random_model_config(model_cfg))
        ref = model_cfg.pretrained
        gguf = _gguf_kwargs(model_cfg, ref)
        source = resolve_source(ref, gguf.get("gguf_file"))
        if gguf:
            log.info("loading %s from %s/%s (dequantising the GGUF file to float32 takes about 30 s)...",
                     model_cfg.name, source, gguf["gguf_file"])
        try:
            return AutoModelForCausalLM.from_pretrained(source, **gguf)
        except Exception as exc:
            raise _load_error("causal LM", ref, exc) from None


def build_causal_lm(model_cfg: Any, spec: AdapterSpec) -> tuple[nn.Module, list[str]]:
    """Load a causal LM and inject the adapter (plus an Embedding LoRA on ``model.embedding_targets``)."""
    model = load_causal_lm(model_cfg)
    fast_model_dropout(model, model_cfg)
    wrapped = apply_adapter(model, spec, list(model_cfg.modules_to_save or []))
    embeddings = list(model_cfg.get("embedding_targets") or [])
    if embeddings:
        if spec.layer != "lora":
            raise UserError(f"model.embedding_targets needs adapter=lora (Embedding LoRA), got adapter={spec.name}")
        from adapters import wrap_linears

        try:  # no dropout: the inputs of an embedding are token ids
            wrapped += wrap_linears(model, embeddings, adapter="lora", r=spec.r, lora_alpha=spec.lora_alpha,
                                    lora_dropout=0.0, use_rslora=bool(spec.layer_kwargs.get("use_rslora", False)))
        except ValueError as exc:
            raise UserError(f"model.embedding_targets: {exc}") from None
    return model, wrapped
