"""The speed benchmarks' variants run on a tiny random BERT and their reports have every key (no timing)."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import tiny_bert

from benchmarks import harness, inference, step_time, trainer_overhead


def test_variants_set_up_what_they_claim():
    base = tiny_bert(num_labels=2)
    batch = harness.make_batch(base, batch_size=2, seq_len=8, device=torch.device("cpu"))
    variants = {name: harness.build_variant(name, base, r=4, lora_alpha=8) for name in harness.STEP_VARIANTS}
    for variant in variants.values():
        variant.step(batch)
    floor = variants["floor"]
    assert floor.optimizer is None and floor.trainable == 0
    assert all(p.grad is None for p in floor.model.parameters())  # backward ran through activations only
    assert variants["full"].trainable == sum(p.numel() for p in base.parameters())
    wrapped = variants["lora"].wrapped
    assert len(wrapped) == 2 * 6 + 1 and "classifier" not in wrapped  # q, k, v, 3 dense per layer + pooler
    for name in ("dora", "sora", "peft_lora", "peft_dora"):
        assert variants[name].wrapped == wrapped, name
    assert variants["lora"].trainable == variants["peft_lora"].trainable
    assert variants["dora"].trainable == variants["peft_dora"].trainable


def test_quick_run_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--batch-size", "2", "--seq-len", "8", "--r", "4", "--json", str(out)]
    args = step_time.parse_args(argv + ["--threads", str(torch.get_num_threads())])  # leave the thread count as is
    report = step_time.run_benchmark(args, tiny_bert(num_labels=2), "tiny random BERT")
    saved = json.loads(out.read_text())
    assert saved.keys() >= {"command", "settings", "environment", "steps", "inference", "targets", "wall_s"}
    assert list(saved["steps"]) == list(harness.STEP_VARIANTS)
    for name, row in saved["steps"].items():
        assert row.keys() >= {"median_ms", "peak_memory_mib", "trainable_params", "vs_floor"}, name
        assert row["median_ms"] > 0 and row["peak_memory_mib"] > 0
    assert "vs_peft" in saved["steps"]["lora"] and "vs_peft" in saved["steps"]["dora"]
    assert list(saved["inference"]) == list(inference.INFERENCE_VARIANTS)
    assert saved["targets"].keys() >= set(step_time.TARGETS) | {"lora_merged_vs_plain"}
    table = step_time.format_table(report)
    assert "| lora |" in table and "lora_vs_floor" in table


def test_trainer_time_split():
    """Step 1.0 s, next batch 0.01 s, a log line 0.05 s after every 4th step, a checkpoint 0.5 s after the 8th."""
    begin, end, t = [], [], 0.0
    for step in range(1, 13):
        begin.append(t)
        t += 1.0
        end.append(t)
        t += 0.01 + (0.05 if step % 4 == 0 else 0.0) + (0.5 if step % 8 == 0 else 0.0)
    clock = {"begin": begin, "end": end, "steps": list(range(1, 13))}
    split = trainer_overhead.split_trainer_time(clock, 32, log_every=4, save_every=8, default_log=20, default_save=100)
    assert split["step_s"] == pytest.approx(1.0)
    assert split["data_s"] == pytest.approx(0.01)
    assert split["log_line_s"] == pytest.approx(0.05)
    assert split["checkpoint_s"] == pytest.approx(0.5)
    around = 0.01 + 0.05 / 20 + 0.5 / 100
    assert split["overhead"] == pytest.approx(around / (1.0 + around))


def test_end_to_end_report_gives_medians_and_our_ratio_to_theirs():
    from benchmarks import end_to_end

    def run(rate, wall, acc):
        return {"train_samples_per_s": rate, "wall_s": wall, "peak_rss_mib": 900.0, "dev_accuracy": acc}

    runs = {"ours:lora": [run(120.0, 90.0, 0.84), run(100.0, 80.0, 0.84), run(110.0, 85.0, 0.84)],
            "theirs:lora": [run(80.0, 110.0, 0.83), run(90.0, 100.0, 0.83), run(85.0, 120.0, 0.83)],
            "ours:sora": [run(95.0, 95.0, 0.82)]}
    summary = end_to_end.summarize(runs)
    assert summary["ours:lora"]["train_samples_per_s"] == 110.0 and summary["theirs:lora"]["wall_s"] == 110.0
    table = end_to_end.format_report({"environment": {"device": "cpu", "dtype": "float32", "threads": 2,
                                                                      "processor": "test CPU"},
                                      "load_before": None, "load_after": None, "summary": summary})
    assert "| main.py lora | 110.0 | 85.0 | 900 | 0.8400 | 1.29x |" in table  # 110 / 85
    assert "| Trainer + PEFT lora | 85.0 |" in table and "| main.py sora | 95.0 | 95.0 | 900 | 0.8200 | – |" in table


def test_sst2_batches_have_real_lengths_grouped_and_every_variant_cycles_through_them():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(harness.minilm_path())
    batches = harness.sst2_batches(tokenizer, batch_size=4, count=3, max_len=64, device=torch.device("cpu"))
    lengths = [b["attention_mask"].sum(1).tolist() for b in batches]
    assert len(batches) == 3 and all(len(row) == 4 for row in lengths)
    flat = [n for row in lengths for n in row]
    assert flat == sorted(flat) and max(flat) <= 64  # length-grouped, truncated
    for batch, row in zip(batches, lengths, strict=True):
        assert batch["input_ids"].shape[1] == max(row)  # padded to its own longest sentence only
    base = tiny_bert(num_labels=2)
    varied = [harness.make_batch(base, 2, n, torch.device("cpu"), seed=n) for n in (5, 9, 13)]
    steps, _ = step_time.bench_steps(base, varied, ["floor", "lora"], rounds=1, steps_per_round=3, warmup=0, r=4)
    assert set(steps) == {"floor", "lora"} and all(len(row["times_ms"]) == 3 for row in steps.values())


def test_analysis_cost_report_on_a_tiny_model(tmp_path):
    from benchmarks import analysis_cost

    out = tmp_path / "cost.json"
    args = analysis_cost.parse_args(["--steps", "1", "--batch-size", "2", "--seq-len", "8", "--json", str(out),
                                     "--threads", str(torch.get_num_threads())])
    report = analysis_cost.run(args, tiny_bert(num_labels=2))
    assert json.loads(out.read_text())["methods"].keys() == {"lora", "dora", "full"}
    for row in report["methods"].values():
        assert all(row[k] > 0 for k in ("step_s", "grad_norm_s", "component_norms_s", "weight_decomposition_s"))
        assert row["log_grad_norms_fraction"] == pytest.approx(row["component_norms_s"] / 20 / row["step_s"])
