"""dropout_sharing="shared": one mask per input tensor per forward pass, PEFT's per-layer distribution.

Checked on a toy attention-like block (q, k, v read the same x; ``out`` reads another tensor) for every adapter
family that uses the base class's input dropout.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from adapters import AdapterLayer, wrap_linears
from adapters.dropout import CACHE_ATTR, dropout_mask

FAMILIES = ["lora", "dora", "sora", "gumbel", "sdlora"]
P = 0.3


class Block(nn.Module):
    """q, k, v read x; out reads q(x) + k(x) * v(x)."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.q(x) + self.k(x) * self.v(x))


class Model(nn.Module):
    def __init__(self, checkpointed: bool | None = None) -> None:
        super().__init__()
        self.block = Block()
        self.checkpointed = checkpointed  # None: plain; True / False: torch checkpoint with use_reentrant=...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed is None:
            return self.block(x)
        return checkpoint(self.block, x, use_reentrant=self.checkpointed)


def build(family: str, sharing: str = "shared", p: float = P, checkpointed: bool | None = None) -> Model:
    torch.manual_seed(0)
    model = Model(checkpointed).double()
    wrap_linears(model, ["q", "k", "v", "out"], adapter=family, r=2, lora_alpha=4, lora_dropout=p,
                 dropout_sharing=sharing)
    with torch.no_grad():  # non-zero B so that the branch (and its dropout) shows in the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    return model.train()


def record_dropped(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(layer kind name, x, x_d) of every ``dropout_input`` call from now on."""
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    original = AdapterLayer.dropout_input

    def spy(self: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
        x_d = original(self, x)
        calls.append((self.name_for_test, x, x_d))
        return x_d

    monkeypatch.setattr(AdapterLayer, "dropout_input", spy)
    return calls


def name_layers(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            module.name_for_test = name.rsplit(".", 1)[-1]


def inputs() -> torch.Tensor:
    return torch.rand(3, 5, 6, dtype=torch.float64) + 0.5  # no zeros: the mask is x_d != 0


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_masks_between_layers_reading_one_input_only(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build(family)
    name_layers(model)
    calls = record_dropped(monkeypatch)
    model(inputs())
    dropped = {name: x_d for name, _, x_d in calls}
    assert set(dropped) == {"q", "k", "v", "out"}
    assert dropped["k"] is dropped["q"] and dropped["v"] is dropped["q"]  # one mask, one product
    masks = {name: (x_d != 0) for name, x_d in dropped.items()}
    assert not masks["q"].all() and masks["q"].any()
    assert not torch.equal(masks["out"], masks["q"][..., : masks["out"].shape[-1]])
    assert getattr(model, CACHE_ATTR)._key is None  # cleared after the forward pass: nothing outlives it


@pytest.mark.parametrize("family", FAMILIES)
def test_independent_mode_draws_one_mask_per_layer(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build(family, "independent")
    name_layers(model)
    calls = record_dropped(monkeypatch)
    model(inputs())
    masks = {name: x_d != 0 for name, _, x_d in calls}
    assert not torch.equal(masks["q"], masks["k"]) and not torch.equal(masks["k"], masks["v"])


@pytest.mark.parametrize("sharing", ["shared", "independent"])
def test_lora_output_is_the_explicit_formula_with_the_recovered_mask(sharing: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """y = W x + b + s B A (mask ⊙ x / (1 - p)), in float64, for every layer."""
    model = build("lora", sharing)
    name_layers(model)
    calls = record_dropped(monkeypatch)
    outputs = {}
    for name in ("q", "k", "v", "out"):
        getattr(model.block, name).register_forward_hook(
            lambda mod, args, out, name=name: outputs.__setitem__(name, out))
    model(inputs())
    for name, x, x_d in calls:
        layer = getattr(model.block, name)
        mask = (x_d != 0).double()
        torch.testing.assert_close(x_d, mask * x / (1 - P), rtol=1e-15, atol=0)
        base = layer.base_layer
        branch = (mask * x / (1 - P)) @ layer.lora_A.T @ layer.lora_B.T
        expected = x @ base.weight.T + base.bias + layer.scaling * branch
        torch.testing.assert_close(outputs[name], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_mode_has_no_dropout(family: str) -> None:
    x = inputs()
    model = build(family).eval()
    plain = build(family, p=0.0).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_mask_distribution_is_bernoulli_keep_one_minus_p() -> None:
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    mask = dropout_mask(x, P)
    assert torch.equal(mask.unique(), torch.tensor([0.0, 1.0]).div_(1 - P))  # nn.Dropout's scale, bit for bit
    keep = (mask != 0).double()
    assert abs(keep.mean().item() - (1 - P)) < 5 * (P * (1 - P) / keep.numel()) ** 0.5
    # independent entries: neighbours are uncorrelated
    corr = torch.corrcoef(torch.stack([keep[:, :-1].flatten(), keep[:, 1:].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.01
    low = dropout_mask(torch.ones(1000, 1000, dtype=torch.bfloat16), P)  # float32 uniforms for low precision
    assert abs((low != 0).double().mean().item() - (1 - P)) < 0.003


def test_no_mask_is_shared_across_forward_passes_or_calls_of_one_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("lora")
    name_layers(model)
    calls = record_dropped(monkeypatch)
    x = inputs()
    model(x)
    model(x)  # the same input tensor object again: a new forward pass draws new masks
    first, second = calls[0][2], calls[4][2]
    assert calls[0][0] == calls[4][0] == "q" and not torch.equal(first != 0, second != 0)
    layer = model.block.q  # called directly, twice with one tensor: a layer never reuses its own mask
    assert not torch.equal(layer.dropout_input(x) != 0, layer.dropout_input(x) != 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_masks_and_random_stream(family: str) -> None:
    """RNG consumption depends only on the forward pass's structure (so exact resume holds)."""
    results = []
    for _ in range(2):
        model = build(family)
        torch.manual_seed(123)
        y = model(inputs())
        results.append((y.detach(), torch.rand(4)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", ["lora", "dora"])
def test_gradient_checkpointing_recomputes_the_same_masks(family: str, reentrant: bool) -> None:
    x = inputs().requires_grad_(True)
    grads = []
    for checkpointed in (None, reentrant):
        model = build(family, checkpointed=checkpointed)
        torch.manual_seed(7)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-12, atol=1e-12)


def test_unknown_sharing_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="dropout_sharing must be one of shared, independent"):
        wrap_linears(Model(), ["q"], lora_dropout=0.1, dropout_sharing="per-token")
