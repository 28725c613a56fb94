"""Export an adapted model in PEFT's LoRA format (``adapter_config.json`` + ``adapter_model.safetensors``).

``peft.PeftModel.from_pretrained(base_model, path)`` then rebuilds the same function:
- LoRA as is (Linear and Embedding);
- DoRA with ``use_dora: true`` and the magnitude as ``lora_magnitude_vector``;
- SoRA as plain LoRA: ranks with a zero gate are dropped, the gate is folded into B, and each
  module's rank (and the alpha that keeps its scaling) goes into ``rank_pattern``/``alpha_pattern``;
- modules listed in ``modules_to_save`` (the task head) as full weights.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .base import adapter_layers
from .inject import SAVED_ATTR

PREFIX = "base_model.model."
# the end of a transformers model class name -> PEFT's task_type (what AutoPeftModelFor... loads)
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``'s head, from its class name (``...ForSequenceClassification`` ->
    ``SEQ_CLS``, ``...ForCausalLM`` -> ``CAUSAL_LM``, ...); None where PEFT has none (e.g. image classifiers)."""
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if name.endswith(suffix)), None)


def _auto_task_type(model: nn.Module, saved: list[str]) -> str | None:
    task = peft_task_type(model)
    if task in (None, "CAUSAL_LM"):
        return task
    return task if saved else None  # PEFT expects a trained head in the export for the classifier task types


def export_peft(model: nn.Module, path: str | os.PathLike, task_type: str | None = "auto",
                base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s adapters and saved modules to ``path`` in PEFT's LoRA format; returns the path.

    ``task_type``: ``"auto"`` = from the model's head (:func:`peft_task_type`); a classifier-type head only when
    ``modules_to_save`` holds it (PEFT then loads the head from the export), else None. ``base_model_name_or_path``:
    what PEFT's ``AutoPeftModel...`` classes load the base from (default: the model config's ``_name_or_path``).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapter layers to export")
    exported = {}
    for name, layer in layers.items():  # every layer says what it is in PEFT's format (or that it has none)
        try:
            exported[name] = layer.peft_tensors()
        except ValueError as exc:
            raise ValueError(f"{exc} (e.g. {name!r})") from None
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"unmerge the model before exporting (module {merged[0]!r} is merged)")
    use_rslora = {m.use_rslora for m in layers.values()}
    if len(use_rslora) > 1:
        raise ValueError("cannot export a model that mixes rsLoRA and plain LoRA scaling")
    rslora = use_rslora.pop()
    dora_flags = {m.peft_use_dora for m in layers.values()} - {None}
    if len(dora_flags) > 1:
        raise ValueError("cannot export a model that mixes DoRA with other adapter kinds")
    use_dora = dora_flags == {True}

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts = set()
    for name, layer in layers.items():
        rank, layer_tensors = exported[name]
        if rank == 0:
            continue  # e.g. every gate of a SoRA layer is zero: the layer is its base layer again
        ranks[name] = rank
        alphas[name] = layer.scaling * (math.sqrt(rank) if rslora else rank)
        dropouts.add(layer.lora_dropout_p)
        for key, value in layer_tensors.items():
            tensors[f"{PREFIX}{name}.{key}"] = value
    if not ranks:
        raise ValueError("every adapter rank was pruned away: there is nothing to export")

    saved = list(getattr(model, SAVED_ATTR, []))
    for module_name in saved:
        for key, value in model.get_submodule(module_name).state_dict().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value.detach()

    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": _auto_task_type(model, saved) if task_type == "auto" else task_type,
        "base_model_name_or_path": (base_model_name_or_path if base_model_name_or_path is not None
                                    else getattr(getattr(model, "config", None), "_name_or_path", None)),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
        "use_rslora": rslora,
        "use_dora": use_dora,
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.contiguous().cpu() for k, v in tensors.items()}
    save_file(contiguous, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
