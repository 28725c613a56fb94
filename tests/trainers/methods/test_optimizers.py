"""Split optimizers: the proximal gate step, the parameter split and the warmup schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainers.loop.optimizers import build_warmup_scheduler
from trainers.methods.sora import ProximalAdamW, build_sora_optimizers, is_gate_parameter, set_sparse_lambda


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.block = nn.Module()
        self.block.gate = nn.Parameter(torch.tensor([1.0, -0.5, 0.0004, -0.0002]))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def soft_threshold(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0)


@pytest.mark.parametrize("mode", ["lr_scaled", "soft_absolute"])
def test_proximal_step_is_adamw_then_soft_threshold(mode):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(50) * 0.01)
    q = nn.Parameter(p.detach().clone())
    grad = torch.randn(50)
    lr, lam = 0.01, 1.0 if mode == "lr_scaled" else 0.01
    prox = ProximalAdamW([p], lr=lr, betas=(0.9, 0.98), sparse_lambda=lam, threshold_mode=mode)
    ref = torch.optim.AdamW([q], lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    for _ in range(3):
        p.grad, q.grad = grad.clone(), grad.clone()
        prox.step()
        ref.step()
        with torch.no_grad():
            q.copy_(soft_threshold(q, lam * lr if mode == "lr_scaled" else lam))
        assert torch.equal(p, q)
    assert (p == 0).sum() > 0  # the threshold produced exact zeros
    assert prox.param_groups[0]["weight_decay"] == 0.0


def test_threshold_follows_the_scheduled_lr():
    p = nn.Parameter(torch.ones(4))
    opt = ProximalAdamW([p], lr=0.1, sparse_lambda=0.5)
    sched = build_warmup_scheduler(opt, num_steps=10, warmup_ratio=0.2)
    assert opt.param_groups[0]["lr"] == 0.0  # warmup starts at 0
    p.grad = torch.zeros(4)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4))  # t = 0.5 * 0 = 0
    sched.step()
    assert opt.threshold(opt.param_groups[0]) == pytest.approx(0.5 * 0.05)


def test_sparse_lambda_can_change_and_is_saved():
    p = nn.Parameter(torch.ones(3))
    opt = ProximalAdamW([p], lr=0.1, sparse_lambda=0.0)
    set_sparse_lambda(opt, 0.7)
    state = opt.state_dict()
    assert state["param_groups"][0]["sparse_lambda"] == 0.7
    other = ProximalAdamW([nn.Parameter(torch.ones(3))], lr=0.1)
    other.load_state_dict(state)
    assert other.param_groups[0]["sparse_lambda"] == 0.7
    with pytest.raises(ValueError):
        set_sparse_lambda(opt, -1.0)
    with pytest.raises(ValueError):
        ProximalAdamW([p], sparse_lambda=-0.1)
    with pytest.raises(ValueError):
        ProximalAdamW([p], threshold_mode="lr")


def test_build_sora_optimizers_splits_gates_from_the_rest():
    model = Gated()
    gate_opt, base_opt = build_sora_optimizers(model, base_lr=1e-4, gate_lr=1e-3, sparse_lambda=0.2,
                                               betas=(0.9, 0.98), weight_decay=0.01)
    assert isinstance(gate_opt, ProximalAdamW)
    assert [id(p) for g in gate_opt.param_groups for p in g["params"]] == [id(model.block.gate)]
    base = {id(p) for g in base_opt.param_groups for p in g["params"]}
    assert base == {id(model.lin.weight), id(model.lin.bias)}  # frozen parameters stay out
    assert base_opt.param_groups[0]["weight_decay"] == 0.01 and base_opt.param_groups[0]["lr"] == 1e-4
    assert gate_opt.param_groups[0]["weight_decay"] == 0.0 and gate_opt.param_groups[0]["lr"] == 1e-3
    assert gate_opt.param_groups[0]["sparse_lambda"] == 0.2
    assert is_gate_parameter("encoder.layer.0.query.gate") and not is_gate_parameter("encoder.gates")


def test_no_gate_optimizer_without_gates():
    gate_opt, base_opt = build_sora_optimizers(nn.Linear(3, 2))
    assert gate_opt is None and len(base_opt.param_groups[0]["params"]) == 2


def test_warmup_schedules_ten_and_two_percent():
    model = Gated()
    gate_opt, base_opt = build_sora_optimizers(model, base_lr=1.0, gate_lr=1.0)
    base = build_warmup_scheduler(base_opt, 100, 0.1)
    gate = build_warmup_scheduler(gate_opt, 100, 0.02)
    lrs = []
    for _ in range(100):
        lrs.append((base_opt.param_groups[0]["lr"], gate_opt.param_groups[0]["lr"]))
        base_opt.step()  # no gradients: nothing moves, the schedulers just advance
        gate_opt.step()
        base.step()
        gate.step()
    assert lrs[0] == (0.0, 0.0)
    assert lrs[5] == pytest.approx((0.5, 95 / 98)) and lrs[10] == pytest.approx((1.0, 90 / 98))
    assert lrs[2] == pytest.approx((0.2, 1.0)) and lrs[1][1] == pytest.approx(0.5)
    assert lrs[99] == pytest.approx((1 / 90, 1 / 98))
