"""Measure how far our LoRA / DoRA are from Hugging Face PEFT (and from a float64 reference).

Both models start from the embedded all-MiniLM-L6-v2 with every linear layer adapted (r=8,
lora_alpha=16) and the same random adapter weights; one batch of real SST-2 sentences goes
through both, in eval mode and in train mode with adapter dropout 0.1 (the same seeded masks).
Printed: the largest absolute difference of the logits and of every trainable gradient, against
PEFT in float32, and the same for each implementation against our model run in float64.

    python benchmarks/parity.py              # ~1 min on 2 CPU cores
    python benchmarks/parity.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a script (python benchmarks/parity.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from adapters import adapter_layers, export_peft, wrap_linears
from benchmarks.harness import minilm_path

R, ALPHA = 8, 16


def sentences(count: int) -> list[str]:
    root = Path(os.environ.get("DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = root / "sst2" / "dev.tsv"
    if path.exists():
        with path.open(encoding="utf-8") as fh:
            return [row["sentence"] for row in csv.DictReader(fh, delimiter="\t")][:count]
    return [f"sentence number {i} is {'good' if i % 2 else 'bad'}" for i in range(count)]


def build_pair(adapter: str, dropout: float, folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our model and PEFT's with identical (random, non-trivial) adapter and head weights: ours goes to PEFT
    through ``export_peft`` and ``PeftModel.from_pretrained``, the way a user would move it."""
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    reference = copy.deepcopy(base)
    wrap_linears(base, "all-linear", adapter=adapter, r=R, lora_alpha=ALPHA, lora_dropout=dropout,
                 modules_to_save=["classifier"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter_layers(base).values():
            layer.lora_B.normal_(0, 0.02, generator=generator)
            if adapter == "dora":
                layer.magnitude.mul_(1 + 0.05 * torch.randn(layer.magnitude.shape, generator=generator))
    export_peft(base, folder)
    return base, PeftModel.from_pretrained(reference, folder, is_trainable=True)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable gradients keyed by a name both implementations share."""
    out = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        key = (name.replace("base_model.model.", "").replace(".default", "").replace(".weight", "")
               .replace(".modules_to_save", "").replace("lora_magnitude_vector", "magnitude"))
        out[key.replace(".base_layer", "")] = param.grad.detach().double()
    return out


def run(model: torch.nn.Module, batch: dict[str, torch.Tensor], train: bool) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    model.train(train)
    torch.manual_seed(1234)  # the same dropout masks: both draw them in the same module order
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach().double(), grads(model)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:4]
    return max((a[k] - b[k]).abs().max().item() for k in a)


def measure(adapter: str, dropout: float, train: bool, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        ours, peft_model = build_pair(adapter, dropout, Path(folder))
    logits_ours, grads_ours = run(ours, batch, train)
    logits_peft, grads_peft = run(peft_model, batch, train)
    reference = copy.deepcopy(ours).double()
    logits_ref, grads_ref = run(reference, batch, train)
    return {
        "logits_vs_peft": (logits_ours - logits_peft).abs().max().item(),
        "grads_vs_peft": max_diff(grads_ours, grads_peft),
        "ours_logits_vs_fp64": (logits_ours - logits_ref).abs().max().item(),
        "peft_logits_vs_fp64": (logits_peft - logits_ref).abs().max().item(),
        "ours_grads_vs_fp64": max_diff(grads_ours, grads_ref),
        "peft_grads_vs_fp64": max_diff(grads_peft, grads_ref),
        "tensors_compared": len(grads_ours) + 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()  # the new head's 'MISSING' load report, once per model
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    batch = dict(tokenizer(sentences(args.batch_size), padding=True, truncation=True, max_length=64,
                           return_tensors="pt"))
    batch["labels"] = torch.arange(args.batch_size) % 2
    rows = []
    for adapter in ("lora", "dora"):
        for dropout, train in ((0.0, False), (0.0, True), (0.1, True)):
            result = {"adapter": adapter, "lora_dropout": dropout, "mode": "train" if train else "eval",
                      **measure(adapter, dropout, train, batch)}
            rows.append(result)
            print(f"{adapter:5s} dropout {dropout:.1f} {result['mode']:5s} | vs PEFT: logits "
                  f"{result['logits_vs_peft']:.1e} grads {result['grads_vs_peft']:.1e} | vs float64: "
                  f"ours {result['ours_logits_vs_fp64']:.1e}/{result['ours_grads_vs_fp64']:.1e}, "
                  f"PEFT {result['peft_logits_vs_fp64']:.1e}/{result['peft_grads_vs_fp64']:.1e} (logits/grads)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
