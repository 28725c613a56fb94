"""adapter.threshold_mode=official: the official SoRA code's SparseAdamW, checked against a copy of its update rule
written from the published math; the renamed soft-threshold mode; the seed's gate lr and the sparse_lambda=0 warning."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from _config import compose_config
from torch import nn

from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError
from trainers.experiments.single import train_run
from trainers.methods.sora import METHOD, OfficialSparseAdamW, ProximalAdamW, build_sora_optimizers, set_sparse_lambda

CONF = Path(__file__).resolve().parents[3] / "conf"


def compose_cfg(overrides):
    return compose_config(list(overrides))


def official_rule(p, grads, lrs, lam, betas=(0.9, 0.999), eps=1e-6):
    """The published SparseAdamW, step by step: transformers' AdamW (eps added to sqrt(v), bias correction folded
    into the step size) and then p[p > lam] -= lam; p[p < -lam] += lam; p[|p| < lam] = 0."""
    p = p.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    b1, b2 = betas
    for k, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * math.sqrt(1 - b2 ** k) / (1 - b1 ** k)
        p = p + (m / (v.sqrt() + eps)) * (-step)
        p = torch.where(p > lam, p - lam, p)
        p = torch.where(p < -lam, p + lam, p)
        p = torch.where(p.abs() < lam, torch.zeros_like(p), p)
    return p


def run_ours(opt_cls, p0, grads, lrs, **kwargs):
    p = nn.Parameter(p0.clone())
    opt = opt_cls([p], lr=lrs[0], **kwargs)
    for g, lr in zip(grads, lrs, strict=True):
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        opt.step()
    return p.detach()


def inputs(steps=20, n=768, seed=0, init="randn"):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=gen) if init == "randn" else torch.ones(n)
    grads = [torch.randn(n, generator=gen) * 0.1 for _ in range(steps)]
    lrs = [8e-4 * min(1.0, (k + 1) / 3) * (steps - k) / steps for k in range(steps)]  # warmup then decay
    return p0, grads, lrs


def test_official_mode_matches_the_published_rule():
    p0, grads, lrs = inputs()
    ours = run_ours(OfficialSparseAdamW, p0, grads, lrs, sparse_lambda=3e-4)
    ref = official_rule(p0, grads, lrs, 3e-4)
    assert (ours - ref).abs().max().item() <= 1e-7
    assert (ref == 0).sum() > 0 and torch.equal(ours == 0, ref == 0)
    # the soft-threshold (formerly "absolute") is a different rule on the same gradients
    soft = run_ours(ProximalAdamW, p0, grads, lrs, betas=(0.9, 0.999), eps=1e-6, sparse_lambda=3e-4,
                    threshold_mode="soft_absolute")
    assert (soft - ref).abs().max().item() > 1e-5


def test_official_rule_zeroes_gates_below_twice_lambda():
    p0, grads, lrs = inputs(init="ones")
    ours = run_ours(OfficialSparseAdamW, p0, grads, lrs, sparse_lambda=0.05)
    ref = official_rule(p0, grads, lrs, 0.05)
    assert int((ours == 0).sum()) == int((ref == 0).sum()) == 768
    soft = run_ours(ProximalAdamW, p0, grads, lrs, betas=(0.9, 0.999), eps=1e-6, sparse_lambda=0.05,
                    threshold_mode="soft_absolute")
    assert int((soft == 0).sum()) < 768
    # one step with lr 0 isolates the threshold: |p| < 2 lam -> 0, the rest move lam towards 0
    lam = 0.1
    p = nn.Parameter(torch.tensor([0.05, 0.15, 0.25, -0.15, -0.3, 0.1]))
    opt = OfficialSparseAdamW([p], lr=0.0, sparse_lambda=lam)
    p.grad = torch.zeros(6)
    opt.step()
    expected = torch.tensor([0.0, 0.0, 0.25 - lam, 0.0, -0.3 + lam, 0.1])  # exactly lam stays (not < lam)
    assert torch.allclose(p.detach(), expected, atol=1e-7)


def test_official_optimizer_defaults_state_and_lambda_changes():
    p = nn.Parameter(torch.ones(4))
    opt = OfficialSparseAdamW([p], lr=1e-3, sparse_lambda=0.2)
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"], group["correct_bias"]) == ((0.9, 0.999), 1e-6,
                                                                                             0.0, True)
    set_sparse_lambda(opt, 0.3)
    p0, grads, lrs = inputs(steps=6, n=4)
    a = nn.Parameter(p0.clone())
    first = OfficialSparseAdamW([a], lr=1e-2, sparse_lambda=0.01)
    for g in grads[:3]:
        a.grad = g.clone()
        first.step()
    b = nn.Parameter(a.detach().clone())
    second = OfficialSparseAdamW([b], lr=1e-2, sparse_lambda=0.01)
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # a resume: moments and step counts carry over
    for g in grads[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        first.step()
        second.step()
    assert torch.equal(a, b) and opt.param_groups[0]["sparse_lambda"] == 0.3


def test_build_sora_optimizers_official():
    model = nn.Module()
    model.lin = nn.Linear(3, 2)
    model.gate = nn.Parameter(torch.ones(4))
    gate_opt, _ = build_sora_optimizers(model, gate_lr=8e-4, sparse_lambda=3e-4, threshold_mode="official")
    assert isinstance(gate_opt, OfficialSparseAdamW) and gate_opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_absolute_was_renamed():
    cfg = compose_cfg(["adapter=sora", "adapter.threshold_mode=absolute"])
    with pytest.raises(UserError, match="renamed soft_absolute") as err:
        validate_config(cfg)
    assert "official" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="renamed soft_absolute"):
        ProximalAdamW([nn.Parameter(torch.ones(2))], threshold_mode="absolute")
    validate_config(compose_cfg(["adapter=sora", "adapter.threshold_mode=soft_absolute"]))
    validate_config(compose_cfg(["adapter=sora", "adapter.threshold_mode=official"]))


def test_gate_lr_defaults_to_ten_times_the_base_lr():
    model = nn.Module()
    model.lin = nn.Linear(3, 2)
    model.gate = nn.Parameter(torch.ones(4))
    for overrides, expected in (([], 1e-2), (["trainer.base_lr=3e-4"], 3e-3), (["adapter.gate_lr=0.5"], 0.5)):
        cfg = compose_cfg(["adapter=sora", *overrides])
        validate_config(cfg)
        spec = {s.name: s for s in METHOD.optimizers(model, cfg)}["gate"]
        assert spec.build(spec.param_groups).param_groups[0]["lr"] == pytest.approx(expected)


def test_warning_when_sparse_lambda_is_zero():
    (message,) = METHOD.warnings(compose_cfg(["adapter=sora"]))
    assert "sparse_lambda=0" in message and "plain LoRA" in message
    assert METHOD.warnings(compose_cfg(["adapter=sora", "sparse_lambda=0.4"])) == []
    assert METHOD.warnings(compose_cfg(["schedule=xi_stages"])) == []  # later stages threshold


def test_official_mode_in_a_run(tmp_path):
    tiny = ["model=tiny-random-bert", "dataset.max_train_samples=32", "dataset.max_eval_samples=16",
            "trainer.batch_size=8", "trainer.log_every_steps=1"]
    torch.set_num_threads(1)
    sparse = train_run(compose_cfg(tiny + ["adapter=sora", "adapter.threshold_mode=official", "sparse_lambda=0.6"]),
                       tmp_path / "sparse")
    dense = train_run(compose_cfg(tiny + ["adapter=sora", "adapter.threshold_mode=official", "sparse_lambda=1e-4"]),
                      tmp_path / "dense")
    assert sparse["gate_zero_ratio"] == 1.0  # gates start at 1: 4 steps x 0.6 bring every one below 2 x 0.6
    assert dense["gate_zero_ratio"] == 0.0
