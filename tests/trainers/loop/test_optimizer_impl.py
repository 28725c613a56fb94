"""trainer.optimizer_impl: fused / foreach / for_loop AdamW give the same updates; auto picks fused on CPUs."""

from __future__ import annotations

import pytest
import torch
from _config import compose_config
from _trainer_helpers import TINY
from torch import nn

from adapters import wrap_linears
from trainers.loop.optimizers import OPTIMIZER_IMPLS, build_adamw
from trainers.methods import get_method
from trainers.methods.sora import ProximalAdamW, make_gate_optimizer

SHAPES = [(8, 16), (16, 8), (8,), (3, 5)]


def run_steps(impl: str | None, cls: type = torch.optim.AdamW, steps: int = 6, **kwargs) -> list[torch.Tensor]:
    """Parameters after ``steps`` updates with fixed pseudo-random gradients."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = build_adamw([{"params": params}], impl, cls, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("impl", list(OPTIMIZER_IMPLS))
def test_every_impl_gives_the_for_loop_update(impl):
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.98), "weight_decay": 0.01}
    reference = run_steps("for_loop", **kwargs)
    for got, want in zip(run_steps(impl, **kwargs), reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_auto_is_fused_on_cpu_and_the_names_map_to_torch_flags():
    params = [torch.zeros(3, requires_grad=True)]
    assert build_adamw([{"params": params}], "auto").defaults["fused"] is True
    assert build_adamw([{"params": params}], "foreach").defaults["foreach"] is True
    plain = build_adamw([{"params": params}], "for_loop").defaults
    assert (plain["foreach"], plain["fused"]) == (False, False)
    with pytest.raises(ValueError, match="optimizer impl must be one of auto, fused, foreach, for_loop"):
        build_adamw([{"params": params}], "apex")


def test_proximal_gate_optimizer_fused_matches_for_loop():
    kwargs = {"lr": 0.05, "betas": (0.9, 0.98), "sparse_lambda": 0.5}
    reference = run_steps("for_loop", ProximalAdamW, **kwargs)
    fused = run_steps("fused", ProximalAdamW, **kwargs)
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert any((p == 0).any() for p in reference)  # the soft-threshold acted
    gates = [torch.ones(4, requires_grad=True)]
    assert make_gate_optimizer(gates, 0.1, (0.9, 0.98), 0.1, "lr_scaled", "auto").defaults["fused"] is True


@pytest.mark.parametrize("adapter", ["lora", "sora", "loraplus", "gumbel", "sdlora"])
@pytest.mark.parametrize("impl", ["auto", "for_loop"])
def test_config_reaches_every_method_optimizer(adapter, impl):
    extra = ["adapter.optimizer=adamw"] if adapter == "sdlora" else []  # its default is SGD
    cfg = compose_config([*TINY, f"adapter={adapter}", f"trainer.optimizer_impl={impl}", *extra])
    method = get_method(cfg.adapter.name)
    model = nn.Sequential(nn.Linear(4, 4))
    spec = method.adapter_spec(cfg.adapter)
    wrap_linears(model, "0", adapter=spec.layer, r=2, lora_alpha=4, **spec.layer_kwargs)
    for spec in method.optimizers(model, cfg):
        groups = [g for g in spec.param_groups if g["params"]]
        if groups:
            opt = spec.build(groups)
            if isinstance(opt, torch.optim.AdamW):
                assert opt.defaults["fused"] is (impl == "auto")
