"""wrap_linears target matching, freezing, and the errors users see."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import randomize_adapters, tiny_bert, token_batch

from adapters import (
    AdapterLayer,
    LoraEmbedding,
    adapter_state_dict,
    count_trainable_parameters,
    find_targets,
    load_adapter_state_dict,
    merge_model,
    unmerge_model,
    wrap_linears,
)


def test_exact_suffix_regex_and_all_linear_targets():
    model = tiny_bert()
    assert find_targets(model, "bert.encoder.layer.0.attention.self.query") == [
        "bert.encoder.layer.0.attention.self.query"
    ]
    assert find_targets(model, "query") == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert find_targets(model, "attention.output.dense") == [
        f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)
    ]
    assert find_targets(model, r".*layer\.1\..*(key|value)") == [
        "bert.encoder.layer.1.attention.self.key",
        "bert.encoder.layer.1.attention.self.value",
    ]
    all_linear = find_targets(model, "all-linear")
    assert len(all_linear) == 2 * 6 + 1  # q, k, v, attn-out, intermediate, output per layer + pooler
    assert "classifier" not in all_linear


def test_wrap_freezes_everything_but_adapters_and_saved_modules():
    model = tiny_bert()
    names = wrap_linears(model, ["query", "value"], r=4, lora_alpha=8, modules_to_save=["classifier"])
    assert len(names) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"} | {"classifier.weight", "classifier.bias"}
    assert count_trainable_parameters(model) == 4 * (4 * 32 + 32 * 4) + 3 * 32 + 3


def test_unmatched_target_names_the_closest_modules():
    with pytest.raises(ValueError, match=r"target 'querry' matches no module.*closest module names: .*query"):
        wrap_linears(tiny_bert(), "querry")


def test_bad_rank_unknown_adapter_and_double_wrap():
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        wrap_linears(tiny_bert(), "query", r=0)
    with pytest.raises(ValueError, match="r must be a positive integer, got -2"):
        wrap_linears(tiny_bert(), "query", adapter="dora", r=-2)
    with pytest.raises(ValueError, match="unknown adapter 'lorra'; choose one of lora, dora, sora, gumbel"):
        wrap_linears(tiny_bert(), "query", adapter="lorra")
    model = tiny_bert()
    wrap_linears(model, "query")
    with pytest.raises(ValueError, match="is already wrapped by LoraLinear"):
        wrap_linears(model, "query")


def test_target_that_is_not_a_linear_layer():
    with pytest.raises(ValueError, match="cannot adapt a BertSelfAttention"):
        wrap_linears(tiny_bert(), "attention.self")


def test_a_failed_wrap_leaves_the_model_untouched():
    model = tiny_bert()
    with pytest.raises(ValueError):
        wrap_linears(model, ["query", "attention.self"])
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_embedding_targets_take_lora_only():
    model = tiny_bert()
    wrap_linears(model, "word_embeddings", r=2)
    assert isinstance(model.bert.embeddings.word_embeddings, LoraEmbedding)
    with pytest.raises(ValueError, match="supports nn.Linear only"):
        wrap_linears(tiny_bert(), "word_embeddings", adapter="sora")


def test_adapter_state_dict_round_trip_and_mismatch():
    model = tiny_bert()
    wrap_linears(model, "all-linear", adapter="dora", r=4, modules_to_save=["classifier"])
    randomize_adapters(model)
    state = adapter_state_dict(model)
    assert "classifier.weight" in state
    assert not any("base_layer" in k for k in state)
    fresh = tiny_bert()
    wrap_linears(fresh, "all-linear", adapter="dora", r=4, modules_to_save=["classifier"])
    load_adapter_state_dict(fresh, state)
    batch = token_batch()
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    other_rank = tiny_bert()
    wrap_linears(other_rank, "all-linear", adapter="dora", r=2, modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"adapter state does not match the model: .*has shape \(4, 32\)"):
        load_adapter_state_dict(other_rank, state)
    lora = tiny_bert()
    wrap_linears(lora, "all-linear", adapter="lora", r=4, modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="unexpected 13 key"):
        load_adapter_state_dict(lora, state)


@pytest.mark.parametrize("adapter", ["lora", "dora", "sora"])
def test_model_merge_and_unload(adapter):
    model = tiny_bert()
    wrap_linears(model, "all-linear", adapter=adapter, r=4)
    randomize_adapters(model)
    batch = token_batch()
    adapted = model(**batch).logits
    merge_model(model)
    torch.testing.assert_close(model(**batch).logits, adapted, rtol=0, atol=1e-5)
    unmerge_model(model)
    torch.testing.assert_close(model(**batch).logits, adapted, rtol=0, atol=1e-5)
    merge_model(model, unload=True)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    torch.testing.assert_close(model(**batch).logits, adapted, rtol=0, atol=1e-5)
