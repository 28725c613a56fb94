"""Each layer against its equation computed by hand in float64, no-op at init, merge round trips."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adapters import DoraLinear, GumbelLinear, LoraEmbedding, LoraLinear, SoraLinear

ADAPTER_CLASSES = [LoraLinear, DoraLinear, SoraLinear, GumbelLinear]


def make_linear(dtype=torch.float64, bias=True, in_f=12, out_f=10, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("cls", ADAPTER_CLASSES)
def test_start_is_an_exact_no_op(cls):
    base = make_linear(torch.float32)
    x = torch.randn(4, 5, 12)
    expected = base(x)
    layer = cls(base, r=4, lora_alpha=8)
    assert torch.equal(layer(x), expected)
    layer.train()
    assert torch.equal(layer(x), expected)


def test_init_follows_peft():
    layer = LoraLinear(make_linear(torch.float32, in_f=300), r=8, lora_alpha=16)
    assert layer.lora_A.shape == (8, 300) and layer.lora_B.shape == (10, 8)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(300)  # kaiming_uniform(a=sqrt(5)) on fan_in=300
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert not layer.base_layer.weight.requires_grad and layer.lora_A.requires_grad


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_forward_equals_formula(rslora):
    layer = LoraLinear(make_linear(), r=4, lora_alpha=8, use_rslora=rslora)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 12, dtype=torch.float64)
    s = 8 / 2 if rslora else 8 / 4
    assert layer.scaling == s
    W, b, A, B = layer.weight, layer.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + s * x @ (B @ A).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_dora_forward_equals_formula(bias):
    layer = DoraLinear(make_linear(bias=bias), r=4, lora_alpha=8)
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B)
        layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    x = torch.randn(3, 12, dtype=torch.float64)
    W, A, B, m, s = layer.weight, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling
    V = W + s * B @ A
    n = V.norm(dim=1)  # per output row, as PEFT does
    expected = (m / n) * (x @ W.T + s * x @ (B @ A).T)
    if bias:
        expected = expected + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight_norm(), n, rtol=1e-12, atol=1e-12)


def test_dora_norm_is_detached_and_cache_follows_the_weight():
    layer = DoraLinear(make_linear(), r=4, lora_alpha=8)
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B)
    assert not layer.weight_norm().requires_grad
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)  # the cached ||W||^2 must notice this
    V = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer.weight_norm(), V.norm(dim=1), rtol=1e-12, atol=1e-12)


def test_sora_forward_equals_formula():
    layer = SoraLinear(make_linear(), r=4, lora_alpha=8)
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B)
        layer.gate.copy_(torch.tensor([0.5, 0.0, -1.5, 2.0]))
    x = torch.randn(3, 12, dtype=torch.float64)
    W, b, A, B, g, s = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.gate, layer.scaling
    expected = x @ W.T + b + s * ((x @ A.T) * g) @ B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer.effective_rank() == 3


def test_sora_gate_init_options():
    assert torch.equal(SoraLinear(make_linear(), r=6, lora_alpha=8).gate, torch.ones(6, dtype=torch.float64))
    torch.manual_seed(3)
    randn_gate = SoraLinear(make_linear(), r=6, lora_alpha=8, gate_init="randn").gate
    assert not torch.equal(randn_gate, torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate_init must be one of"):
        SoraLinear(make_linear(), r=6, lora_alpha=8, gate_init="zeros")


def test_embedding_lora_equals_formula():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0).double()
    layer = LoraEmbedding(base, r=3, lora_alpha=6)
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    assert torch.equal(layer(ids), base(ids))  # no-op at init
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_A)
    A, B, s = layer.lora_A, layer.lora_B, layer.scaling
    expected = base.weight[ids] + s * A.T[ids] @ B.T
    torch.testing.assert_close(layer(ids), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [LoraLinear, DoraLinear, SoraLinear])
def test_merge_unmerge_round_trip_float32(cls):
    layer = cls(make_linear(torch.float32, in_f=64, out_f=48), r=8, lora_alpha=16)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.normal_(0, 0.2)
    original_weight = layer.weight.detach().clone()
    x = torch.randn(5, 64)
    adapted = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), adapted, rtol=0, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, original_weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer(x), adapted, rtol=0, atol=1e-5)


def test_embedding_merge_round_trip():
    layer = LoraEmbedding(nn.Embedding(30, 8), r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_A.normal_()
    ids = torch.randint(0, 30, (2, 7))
    adapted = layer(ids)
    layer.merge()
    torch.testing.assert_close(layer(ids), adapted, rtol=0, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(ids), adapted, rtol=0, atol=1e-5)


def test_set_lora_alpha_updates_scaling_in_place():
    layer = LoraLinear(make_linear(), r=4, lora_alpha=1)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 12, dtype=torch.float64)
    base = layer.base_layer(x)
    delta_1 = layer(x) - base
    layer.set_lora_alpha(2.0)
    assert layer.scaling == 0.5
    torch.testing.assert_close(layer(x) - base, 2 * delta_1)


def test_branch_never_builds_the_dense_product(monkeypatch):
    """The forward must not compute B @ A (an (out, in) matrix): it multiplies x by A first."""
    layer = LoraLinear(make_linear(torch.float32, in_f=64, out_f=48), r=4, lora_alpha=8)
    seen = []
    original = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    layer(torch.randn(2, 64))
    assert ((48, 4), (4, 64)) not in seen
