"""Gumbel CL-LoRA layer: gate properties, task growth, freezing, pruning, and its equation."""

from __future__ import annotations

import torch
from torch import nn

from adapters import GumbelLinear, entropy, gumbel_sparsemax, gumbel_sparsity_loss, set_gumbel_tau, wrap_linears


def layer_with_tasks(num_tasks: int = 3, seed: int = 0) -> GumbelLinear:
    torch.manual_seed(seed)
    layer = GumbelLinear(nn.Linear(10, 8).double(), r=2, lora_alpha=4)
    for t in range(num_tasks):
        with torch.no_grad():
            layer.lora_B[t].normal_()  # "train" the task's direction
        if t < num_tasks - 1:
            layer.add_task()
    with torch.no_grad():
        layer.gate_logits.copy_(torch.linspace(-0.5, 1.0, num_tasks, dtype=torch.float64))
        layer.magnitudes.copy_(torch.linspace(0.5, 1.5, num_tasks, dtype=torch.float64))
    return layer


def test_sparsemax_is_a_distribution_with_exact_zeros():
    logits = torch.tensor([[3.0, 1.0, -2.0, 2.5], [0.1, 0.2, 0.3, 0.4]])
    beta = gumbel_sparsemax(logits, tau=0.5, noise=False)
    torch.testing.assert_close(beta.sum(-1), torch.ones(2))
    assert (beta[0] == 0).sum() >= 2 and (beta >= 0).all()
    torch.manual_seed(0)
    noisy = gumbel_sparsemax(logits[1].expand(500, 4), tau=1.0)
    torch.testing.assert_close(noisy.sum(-1), torch.ones(500))
    assert (noisy == 0).any()


def test_entropy_treats_zero_as_zero():
    torch.testing.assert_close(entropy(torch.tensor([1.0, 0.0])), torch.tensor(0.0))
    torch.testing.assert_close(entropy(torch.tensor([0.5, 0.5, 0.0])), torch.tensor(0.6931471805599453))


def test_eval_gate_is_deterministic_and_training_gate_is_not():
    layer = layer_with_tasks()
    x = torch.randn(4, 10, dtype=torch.float64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.tau = 1.0
    layer.train()
    torch.manual_seed(0)
    betas = {tuple(layer.beta().tolist()) for _ in range(20)}
    assert len(betas) > 1


def formula(layer: GumbelLinear, x: torch.Tensor) -> torch.Tensor:
    """y = W x + b + sum_t beta_t alpha_t direction_t x, written out from the definitions."""
    active = layer.active.nonzero().flatten().tolist()
    beta = torch.zeros_like(layer.gate_logits)
    beta[active] = gumbel_sparsemax(layer.gate_logits[active], layer.tau, noise=False)
    current = layer.num_tasks - 1
    expected = layer.base_layer(x)
    for t in active:
        A, B = layer.lora_A[t], layer.lora_B[t]
        norm = A.norm() * B.norm()
        direction = B @ A * layer.scaling if t == current else B @ A / norm
        expected = expected + beta[t] * layer.magnitudes[t] * x @ direction.T
    return expected


def test_forward_equals_formula_in_float64():
    layer = layer_with_tasks().eval()
    layer.tau = 0.7
    x = torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), formula(layer, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x @ layer.delta_weight().T, layer(x) - layer.base_layer(x), rtol=1e-12, atol=1e-12)


def test_a_new_task_starts_as_a_no_op_and_earlier_directions_are_frozen():
    layer = layer_with_tasks(2).eval()
    x = torch.randn(4, 10, dtype=torch.float64)
    assert layer.lora_A[0].requires_grad is False and layer.lora_A[1].requires_grad is True
    frozen_a = layer.lora_A[0].detach().clone()
    layer.add_task()
    assert layer.num_tasks == 3 and not layer.lora_B[1].requires_grad
    assert torch.count_nonzero(layer.lora_B[2]) == 0  # the new direction adds nothing yet
    torch.testing.assert_close(layer(x), formula(layer, x), rtol=1e-12, atol=1e-12)
    layer.train()
    layer(x).pow(2).sum().backward()
    assert layer.lora_A[0].grad is None and layer.lora_B[1].grad is None
    assert torch.equal(layer.lora_A[0], frozen_a)
    assert layer.gate_logits.grad is not None and layer.magnitudes.grad is not None
    assert layer.lora_A[2].grad is not None


def test_a_pruned_task_contributes_nothing():
    layer = layer_with_tasks().eval()
    x = torch.randn(4, 10, dtype=torch.float64)
    layer.prune_task(1)
    assert layer.beta()[1] == 0
    with torch.no_grad():
        layer.lora_B[1].mul_(1000.0)  # were it used at all, the output would change
    torch.testing.assert_close(layer(x), formula(layer, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.beta().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_model_level_tau_and_sparsity_loss():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    wrap_linears(model, ["0", "2"], adapter="gumbel", r=2)
    set_gumbel_tau(model, 0.9)
    assert all(m.tau == 0.9 for m in model.modules() if isinstance(m, GumbelLinear))
    for m in model.modules():
        if isinstance(m, GumbelLinear):
            m.add_task()
    model.train()
    model(torch.randn(3, 6))
    loss = gumbel_sparsity_loss(model)
    expected = torch.stack([entropy(m.last_beta) for m in model.modules() if isinstance(m, GumbelLinear)]).mean()
    torch.testing.assert_close(loss, expected)
    assert loss.requires_grad
