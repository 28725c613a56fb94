"""DoRA's ``detach_norm`` option: both gradients against float64 autograd of the explicit formula (fused and
plain paths, with and without dropout), the config key reaching the layer, and the seed's exercise 1
(W = m * d with unit-norm directions) on plain weights and on a trained DoRA layer's merged weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from adapters import DoraLinear, wrap_linears
from adapters.decomposition import magnitude_direction
from trainers.methods import get_method

TOL = {"rtol": 1e-10, "atol": 1e-12}


def make_layer(detach_norm: bool, dropout: float, in_f: int = 12, out_f: int = 10) -> DoraLinear:
    torch.manual_seed(0)
    layer = DoraLinear(nn.Linear(in_f, out_f).double(), r=4, lora_alpha=8, lora_dropout=dropout,
                       detach_norm=detach_norm)
    with torch.no_grad():  # non-trivial A, B (B starts at zero) and m != n
        layer.lora_B.normal_(0, 0.3)
        layer.lora_A.add_(torch.randn_like(layer.lora_A) * 0.3)
        layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    return layer.train()


def reference(layer: DoraLinear, x: torch.Tensor, detach_norm: bool, seed: int):
    """y = W x + b + (m/n - 1) W x_d + (m/n) s B A x_d with n = ||W + s B A||_row, by plain float64 autograd."""
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    m = layer.magnitude.detach().clone().requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    s = layer.scaling
    n = (W + s * B @ A).norm(dim=1)
    if detach_norm:
        n = n.detach()
    torch.manual_seed(seed)
    x_d = F.dropout(x, layer.lora_dropout_p, training=True) if layer.lora_dropout_p else x
    y = x @ W.T + b + (m / n - 1) * (x_d @ W.T) + (m / n) * s * (x_d @ A.T @ B.T)
    return y, (x, A, B, m)


def run(layer: DoraLinear, x: torch.Tensor, fused: bool, seed: int):
    layer.fused = fused
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    return y, (x, layer.lora_A, layer.lora_B, layer.magnitude)


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("tokens", [5, 40])  # both sides of the fused backward's folding threshold (in=12)
def test_gradients_match_float64_autograd_of_the_formula(detach_norm, fused, dropout, tokens):
    layer = make_layer(detach_norm, dropout)
    x = torch.randn(tokens, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y, ours = run(layer, x, fused, seed=11)
    y_ref, refs = reference(layer, x, detach_norm, seed=11)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * weights).sum().backward()
    (y_ref * weights).sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL)
    for name, got, want in zip(("x", "A", "B", "m"), ours, refs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, **TOL, msg=lambda m, n=name: f"d{n}: {m}")


def test_the_two_norms_give_different_direction_gradients_and_the_same_magnitude_gradient():
    x = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for detach in (True, False):
        layer = make_layer(detach, 0.0)
        y, (_, A, B, m) = run(layer, x, fused=True, seed=0)
        y.pow(2).sum().backward()
        grads[detach] = (A.grad.clone(), B.grad.clone(), m.grad.clone())
    torch.testing.assert_close(grads[True][2], grads[False][2], **TOL)  # m enters only the numerator
    for i in (0, 1):  # the norm's own gradient is a real, not a rounding, difference
        rel = (grads[True][i] - grads[False][i]).norm() / grads[False][i].norm()
        assert rel > 0.05


def test_the_config_key_reaches_every_layer():
    method = get_method("dora")
    base = {"name": "dora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear",
            "use_rslora": False}
    for value in (True, False):
        spec = method.adapter_spec(OmegaConf.create({**base, "detach_norm": value}))
        assert spec.layer == "dora" and spec.layer_kwargs["detach_norm"] is value
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        wrap_linears(model, "all-linear", adapter="dora", r=2, **spec.layer_kwargs)
        assert [m.detach_norm for m in model.modules() if isinstance(m, DoraLinear)] == [value, value]


def test_exercise_1_weight_is_magnitude_times_unit_direction():
    W = torch.randn(24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m, d = magnitude_direction(W)
    torch.testing.assert_close(m.unsqueeze(1) * d, W, rtol=1e-14, atol=1e-14)  # W = m * d
    torch.testing.assert_close(d.norm(dim=1), torch.ones(24, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(m, torch.sqrt((W ** 2).sum(dim=1)), rtol=1e-14, atol=1e-14)  # rows, as PEFT


@pytest.mark.parametrize("detach_norm", [True, False])
def test_exercise_1_on_a_trained_dora_layer(detach_norm):
    """After training steps the merged weight W' decomposes into the layer's own magnitude and the unit
    direction of W + s B A: m(W') = magnitude and d(W') = (W + s B A) / ||W + s B A||_row."""
    layer = make_layer(detach_norm, 0.0)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    merged = layer.weight + layer.delta_weight().detach()
    m, d = magnitude_direction(merged)
    V = layer.weight + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(m, layer.magnitude.detach().abs(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d, V / V.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(10, dtype=torch.float64), rtol=1e-12, atol=1e-12)
