"""The CPU dropout generator (numpy SFC64 seeded from torch) and ``FastDropout`` in the model's own dropout.

Semantics checked: nn.Dropout's distribution (keep 1 - p, scale 1 / (1 - p), independent entries), masks that
follow torch's random state (seeding, saved states, activation checkpointing), eval mode as the identity, and
``model.fast_dropout`` choosing the model's dropout modules.
"""

from __future__ import annotations

import pytest
import torch
from _config import compose_config
from _tiny_models import tiny_bert, token_batch
from torch import nn
from torch.utils.checkpoint import checkpoint

from adapters.dropout import FastDropout, dropout_mask, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_cpu_mask_keeps_one_minus_p_with_nn_dropouts_scale(p: float) -> None:
    torch.manual_seed(0)
    mask = dropout_mask(torch.ones(400, 1000), p)
    assert torch.equal(mask.unique(), torch.tensor([0.0, 1.0]).div_(1 - p))  # nn.Dropout's float32 scale
    keep = (mask != 0).double()
    assert abs(keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / keep.numel()) ** 0.5
    rows = keep.mean(dim=1)  # no structure along the flat order: every row keeps 1 - p as well
    assert (rows - (1 - p)).abs().max().item() < 6 * (p * (1 - p) / 1000) ** 0.5


def test_odd_sizes_and_dtypes() -> None:
    torch.manual_seed(0)
    for shape in [(1,), (3, 5, 7), (0, 4)]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            mask = dropout_mask(torch.ones(shape, dtype=dtype), 0.25)
            assert mask.shape == torch.Size(shape) and mask.dtype == dtype
            assert set(mask.unique().tolist()) <= {0.0, torch.tensor(1.0, dtype=dtype).div(0.75).item()}


def test_masks_follow_torchs_random_state() -> None:
    x = torch.ones(64, 64)
    torch.manual_seed(3)
    first, second = dropout_mask(x, 0.3), dropout_mask(x, 0.3)
    assert not torch.equal(first, second)  # successive draws differ
    torch.manual_seed(3)
    assert torch.equal(dropout_mask(x, 0.3), first)
    state = torch.get_rng_state()
    third = dropout_mask(x, 0.3)
    torch.set_rng_state(state)
    assert torch.equal(dropout_mask(x, 0.3), third)  # a resumed run replays the masks


def test_fast_dropout_forward_backward_and_eval() -> None:
    layer = FastDropout(0.2)
    x = torch.rand(4, 50, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    scaled_mask = dropout_mask(x, 0.2)
    torch.testing.assert_close(y, x * scaled_mask, rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, scaled_mask, rtol=0, atol=0)  # d/dx (x * m / (1 - p)) = m / (1 - p)
    assert layer.eval()(x) is x and FastDropout(0.0).train()(x) is x
    assert torch.equal(FastDropout(1.0)(x), torch.zeros_like(x))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_recomputation_draws_the_same_mask(reentrant: bool) -> None:
    block = nn.Sequential(nn.Linear(8, 8), FastDropout(0.5), nn.Linear(8, 1)).double()
    x = torch.rand(16, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    block(x).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(5)
    checkpoint(block, x, use_reentrant=reentrant).sum().backward()
    torch.testing.assert_close(x.grad, plain, rtol=0, atol=0)


def test_use_fast_dropout_replaces_every_dropout_module_and_keeps_eval_outputs() -> None:
    model = tiny_bert(dropout=0.1)
    reference = tiny_bert(dropout=0.1)
    plain = [m.p for m in model.modules() if type(m) is nn.Dropout]
    assert use_fast_dropout(model) == len(plain) > 0
    assert [m.p for m in model.modules() if isinstance(m, FastDropout)] == plain
    assert not any(type(m) is nn.Dropout for m in model.modules())
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
        model.train()
        torch.manual_seed(0)
        first = model(**batch).logits
        torch.manual_seed(0)
        assert torch.equal(model(**batch).logits, first)
        assert not torch.equal(first, reference(**batch).logits)  # the dropout is active in training


@pytest.mark.parametrize("fast", [True, False])
def test_model_fast_dropout_key_chooses_the_models_dropout_modules(fast: bool) -> None:
    from trainers.methods import get_method
    from trainers.models.loading import build_model

    cfg = compose_config(["model=tiny-random-bert", f"model.fast_dropout={str(fast).lower()}",
                          "adapter.dropout_sharing=independent"])
    model, wrapped = build_model(cfg.model, get_method(cfg.adapter.name).adapter_spec(cfg.adapter), num_labels=2)
    kinds = {type(m) for name, m in model.named_modules() if isinstance(m, nn.Dropout) and "lora_dropout" not in name}
    assert kinds == ({FastDropout} if fast else {nn.Dropout})
    # the adapters' own dropout (PEFT's per-layer nn.Dropout in "independent" mode) is not the model's
    assert all(type(m.lora_dropout) is nn.Dropout for m in model.modules() if hasattr(m, "lora_dropout_p"))
    assert wrapped
