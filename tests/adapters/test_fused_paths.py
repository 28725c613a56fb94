"""The fused fast paths (one autograd node per layer) give the same outputs and gradients as the plain
composition of modules, in float64, for every adapter, with and without bias, dropout, a trainable
base layer, token counts on both sides of the DoRA backward's folding threshold and of the merged-weight
threshold (``merging_pays``), and DoRA's node with a dropped input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters import DoraLinear, GumbelLinear, LoraLinear, SoraLinear
from adapters.base import _token_chunks, rank_reduce_tokens, rank_times_tokens
from adapters.dora import merged_weight, merging_pays

CLASSES = [LoraLinear, DoraLinear, SoraLinear, GumbelLinear]
EXACT = {"rtol": 1e-12, "atol": 1e-12}
FUSED_NODES = ("_LowRankLinearFnBackward", "_DoraLinearFnBackward")


def make_layer(cls, bias: bool, dropout: float, in_f: int = 12, out_f: int = 10, r: int = 4) -> nn.Module:
    torch.manual_seed(0)
    layer = cls(nn.Linear(in_f, out_f, bias=bias).double(), r=r, lora_alpha=8, lora_dropout=dropout)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if not name.startswith("base_layer."):
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)
        if isinstance(layer, SoraLinear):
            layer.gate[1] = 0.0  # a pruned-to-be rank: its gradient must still flow
    return layer.train()


def run(layer: nn.Module, x: torch.Tensor, fused: bool, seed: int = 7):
    """Output and every gradient (input and trainable tensors) of one forward/backward."""
    layer.fused = fused
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask on both paths
    y = layer(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)  # a loss that weighs every output
    (y * weights).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters() if p.requires_grad})
    return y, grads


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("tokens", [(2, 3), (4, 9)])  # 6 and 36 tokens: fewer and more than in_features
def test_fused_equals_plain_float64(cls, bias, dropout, tokens):
    layer = make_layer(cls, bias, dropout)
    x = torch.randn(*tokens, 12, dtype=torch.float64)
    y_fused, g_fused = run(layer, x, fused=True)
    y_plain, g_plain = run(layer, x, fused=False)
    torch.testing.assert_close(y_fused, y_plain, **EXACT)
    assert g_fused.keys() == g_plain.keys()
    for name in g_plain:
        assert g_fused[name] is not None, name
        torch.testing.assert_close(g_fused[name], g_plain[name], **EXACT, msg=name)


@pytest.mark.parametrize("cls", CLASSES)
def test_fused_path_is_taken(cls):
    layer = make_layer(cls, bias=True, dropout=0.0)
    layer.fused = True
    y = layer(torch.randn(3, 12, dtype=torch.float64))
    assert type(y.grad_fn).__name__ in FUSED_NODES
    layer.fused = False
    assert type(layer(torch.randn(3, 12, dtype=torch.float64)).grad_fn).__name__ not in FUSED_NODES


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_with_trainable_base_layer(cls, bias):
    """Gradients for W and b (never needed for a frozen base) are right when the base is trained too."""
    layer = make_layer(cls, bias, dropout=0.0)
    layer.base_layer.requires_grad_(True)
    x = torch.randn(5, 7, 12, dtype=torch.float64)
    y_fused, g_fused = run(layer, x, fused=True)
    y_plain, g_plain = run(layer, x, fused=False)
    torch.testing.assert_close(y_fused, y_plain, **EXACT)
    assert "base_layer.weight" in g_plain
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], **EXACT, msg=name)


def test_fused_pruned_sora_with_rank_zero():
    layer = make_layer(SoraLinear, bias=True, dropout=0.0)
    with torch.no_grad():
        layer.gate.zero_()
    layer.prune()
    assert layer.r == 0
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    y_fused, g_fused = run(layer, x, fused=True)
    y_plain, g_plain = run(layer, x, fused=False)
    torch.testing.assert_close(y_fused, layer.base_layer(x), **EXACT)
    torch.testing.assert_close(g_fused["x"], g_plain["x"], **EXACT)


def test_frozen_input_and_no_grad_inference():
    """No input gradient is asked for (the first layer of an adapted model) and inference has no graph."""
    layer = make_layer(DoraLinear, bias=True, dropout=0.0)
    x = torch.randn(4, 12, dtype=torch.float64)
    layer.fused = True
    (layer(x) ** 2).sum().backward()
    fused = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad(set_to_none=True)
    layer.fused = False
    (layer(x) ** 2).sum().backward()
    for name, param in layer.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(fused[name], param.grad, **EXACT, msg=name)
    layer.fused = True
    with torch.inference_mode():
        y = layer(x)
    layer.fused = False
    with torch.inference_mode():
        torch.testing.assert_close(y, layer(x), **EXACT)


def test_autocast_takes_the_plain_path():
    layer = make_layer(LoraLinear, bias=True, dropout=0.0).float()
    x = torch.randn(3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert type(y.grad_fn).__name__ not in FUSED_NODES
    torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=2e-2)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_rank_products_split_over_token_blocks(two_threads):
    """On a multi-threaded CPU the rank-sized products run as batched GEMMs over token blocks."""
    assert _token_chunks(1024, torch.device("cpu")) == 2
    assert _token_chunks(1023, torch.device("cpu")) == 1  # not divisible: one plain GEMM
    generator = torch.Generator().manual_seed(0)
    left, tokens = (torch.randn(s, generator=generator, dtype=torch.float64) for s in ((4, 12), (1024, 12)))
    left_t = torch.randn(4, 1024, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(rank_times_tokens(left, tokens), left @ tokens.T, **EXACT)
    torch.testing.assert_close(rank_reduce_tokens(left_t, tokens), left_t @ tokens, **EXACT)


@pytest.mark.parametrize("cls", CLASSES)
def test_fused_equals_plain_with_token_blocks(cls, two_threads):
    layer = make_layer(cls, bias=True, dropout=0.0)
    x = torch.randn(4, 128, 12, dtype=torch.float64)  # 512 tokens: split in two blocks
    y_fused, g_fused = run(layer, x, fused=True)
    y_plain, g_plain = run(layer, x, fused=False)
    torch.testing.assert_close(y_fused, y_plain, **EXACT)
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], **EXACT, msg=name)


def test_merging_pays_once_tokens_cover_the_weight():
    """DoRA uses the merged weight once tokens x (in + out) >= 4 in out (768 tokens for a 384 x 384 layer)."""
    square, wide = torch.empty(384, 384), torch.empty(1536, 384)
    assert not merging_pays(767, square) and merging_pays(768, square)
    assert not merging_pays(1228, wide) and merging_pays(1229, wide)
    w, a, b = (torch.randn(s, dtype=torch.float64) for s in ((5, 7), (3, 7), (5, 3)))
    torch.testing.assert_close(merged_weight(w, a, b, 2.0), w + 2.0 * b @ a, **EXACT)


# (in, out, tokens, DoRA merges, DoRA folds m / n into W): all four combinations of the two thresholds
PATHS = [(40, 10, 36, True, False), (12, 40, 15, False, True), (12, 10, 36, True, True), (12, 10, 6, False, False)]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(("in_f", "out_f", "tokens", "merges", "folds"), PATHS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_equals_plain_on_both_sides_of_merging(cls, in_f, out_f, tokens, merges, folds, dropout):
    layer = make_layer(cls, bias=True, dropout=dropout, in_f=in_f, out_f=out_f)
    assert merging_pays(tokens, layer.base_layer.weight) == merges and (tokens > in_f) == folds
    x = torch.randn(tokens, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y_fused, g_fused = run(layer, x, fused=True)
    y_plain, g_plain = run(layer, x, fused=False)
    torch.testing.assert_close(y_fused, y_plain, **EXACT)
    assert g_fused.keys() == g_plain.keys()
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], **EXACT, msg=name)
    with torch.no_grad():  # inference takes the same paths without a graph
        layer.eval()
        layer.fused = True
        y_eval = layer(x)
        layer.fused = False
        torch.testing.assert_close(y_eval, layer(x), **EXACT)


def test_dora_with_dropout_is_one_node_unless_the_base_trains():
    layer = make_layer(DoraLinear, bias=True, dropout=0.3)
    x = torch.randn(20, 12, dtype=torch.float64)
    assert type(layer(x).grad_fn).__name__ == "_DoraLinearFnBackward"
    layer.base_layer.weight.requires_grad_(True)  # the node does not give dW with a dropped input
    assert type(layer(x).grad_fn).__name__ not in FUSED_NODES
    y_plain, g_plain = run(layer, x, fused=True)
    assert g_plain["base_layer.weight"] is not None
