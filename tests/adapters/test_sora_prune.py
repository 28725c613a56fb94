"""SoRA pruning and merging keep the function while the rank shrinks."""

from __future__ import annotations

import torch
from _tiny_models import randomize_adapters, tiny_bert, token_batch
from torch import nn

from adapters import (
    SoraLinear,
    adapter_layers,
    effective_ranks,
    merge_sora_model,
    prune_sora_model,
    summarize_gate_sparsity,
    wrap_linears,
)


def sora_model():
    model = tiny_bert()
    wrap_linears(model, "all-linear", adapter="sora", r=8, lora_alpha=16)
    randomize_adapters(model)
    with torch.no_grad():
        for i, layer in enumerate(adapter_layers(model, SoraLinear).values()):
            layer.gate[: i % 8] = 0.0  # layer i loses i % 8 ranks
    return model


def test_gate_sparsity_and_effective_ranks():
    model = sora_model()
    zeros = sum(i % 8 for i in range(13))
    assert summarize_gate_sparsity(model) == zeros / (13 * 8)
    assert list(effective_ranks(model).values()) == [8 - i % 8 for i in range(13)]
    assert summarize_gate_sparsity(tiny_bert()) == 0.0


def test_prune_keeps_outputs_and_shrinks_rank():
    model = sora_model()
    batch = token_batch()
    before = model(**batch).logits
    params_before = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    ranks = prune_sora_model(model)
    assert list(ranks.values()) == [8 - i % 8 for i in range(13)]
    for layer in adapter_layers(model, SoraLinear).values():
        assert layer.lora_A.shape[0] == layer.r == layer.lora_B.shape[1] == layer.gate.shape[0]
        assert torch.equal(layer.gate, torch.ones_like(layer.gate))  # folded into B
    torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-6)
    params_after = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert params_after < params_before


def test_prune_of_a_single_layer_matches_the_formula():
    torch.manual_seed(0)
    layer = SoraLinear(nn.Linear(16, 12).double(), r=5, lora_alpha=10)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate.copy_(torch.tensor([0.3, 0.0, -2.0, 0.0, 1.1]))
    x = torch.randn(4, 16, dtype=torch.float64)
    before = layer(x)
    layer.prune()
    assert layer.r == 3 and layer.scaling == 2.0
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)


def test_merge_sora_model_leaves_plain_linears():
    model = sora_model()
    batch = token_batch()
    before = model(**batch).logits
    merge_sora_model(model)
    assert not any(isinstance(m, SoraLinear) for m in model.modules())
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-5)
