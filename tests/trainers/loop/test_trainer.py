"""A tiny end-to-end run per adapter (in process, tiny-random-bert), and what a run directory holds."""

from __future__ import annotations

import pytest
import torch
from _config import TINY_RUN, compose_config
from _trainer_helpers import jsonl, read_json
from safetensors.torch import load_file

from trainers.experiments.single import train_run
from trainers.loop.checkpoint import list_checkpoints

TINY = TINY_RUN


def make(overrides):
    return compose_config(TINY + list(overrides))


pytestmark = pytest.mark.usefixtures("one_thread")  # small runs on one thread (conftest.py)


@pytest.mark.parametrize("adapter", ["lora", "dora", "sora", "gumbel"])
def test_tiny_run_per_adapter(adapter, tmp_path):
    result = train_run(make([f"adapter={adapter}", "trainer.save_every_steps=2", "trainer.keep_last_checkpoints=2"]),
                       tmp_path)
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics == pytest.approx(result)
    assert metrics["status"] == "completed" and metrics["global_step"] == 5  # ceil(40 / 8)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    assert metrics["train_samples"] == 40 and metrics["train_samples_per_second"] > 0 and metrics["wall_time_s"] > 0
    assert ("gate_zero_ratio" in metrics) == (adapter == "sora")
    lines = jsonl(tmp_path)
    assert all("step" in line for line in lines)
    assert [line["step"] for line in lines if line["split"] == "train"] == [2, 4, 5]
    final_eval = [line for line in lines if line["split"] == "eval"][-1]
    assert final_eval["step"] == 5 and final_eval["eval_accuracy"] == metrics["eval_accuracy"]
    assert final_eval["eval_loss"] == metrics["eval_loss"]
    # checkpoints at steps 2, 4 and the final 5, only the last 2 kept
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    ckpt = tmp_path / "checkpoints" / "step-00000005"
    assert {p.name for p in ckpt.iterdir()} == {"adapter.safetensors", "training_state.pt", "rng_state_0.pt",
                                                "trainer_state.json"}
    objects = torch.load(ckpt / "training_state.pt", weights_only=True)
    assert sorted(objects["optimizers"]) == (["base", "gate"] if adapter == "sora" else ["base"])
    state = read_json(ckpt / "trainer_state.json")["state"]
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (5, 1, 0)
    weights = load_file(str(ckpt / "adapter.safetensors"))
    assert any(k.startswith("classifier.") for k in weights)  # the new task head is saved too
    exported = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"README.md", "labels.json", "tokenizer_config.json"} <= exported  # model card, id2label, tokenizer
    if adapter == "gumbel":
        assert {"adapter_state.safetensors"} <= exported and "adapter_config.json" not in exported
    else:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= exported
        config = read_json(tmp_path / "adapter" / "adapter_config.json")
        assert config["peft_type"] == "LORA" and config["use_dora"] == (adapter == "dora")
        assert config["modules_to_save"] == ["classifier"]


def test_lora_trainable_params_count(tmp_path):
    metrics = train_run(make(["adapter.r=8"]), tmp_path)
    # tiny BERT (hidden 32, ffn 64, 2 layers): per layer 4 x (32+32) + (32+64) + (64+32) = 448 inputs+outputs,
    # x r=8 -> 3584; two layers + the pooler (8 x 64) -> 7680; plus the classifier head 32 x 2 + 2
    assert metrics["trainable_params"] == 7680 + 66


def test_sora_gates_go_to_zero_with_a_large_lambda(tmp_path):
    metrics = train_run(make(["adapter=sora", "sparse_lambda=5", "adapter.gate_lr=0.05", "trainer.epochs=3"]),
                        tmp_path)
    assert metrics["gate_zero_ratio"] > 0.5
    lines = [line for line in jsonl(tmp_path) if line["split"] == "train"]
    assert all(line["sparse_lambda"] == 5 for line in lines) and lines[0]["gate_lr"] > 0
    dense = train_run(make(["adapter=sora", "adapter.gate_lr=0.05", "trainer.epochs=3"]), tmp_path / "dense")
    assert dense["gate_zero_ratio"] == 0.0


def test_gumbel_temperature_anneals_per_step(tmp_path):
    train_run(make(["adapter=gumbel", "adapter.anneal_rate=0.5", "adapter.tau_final=0.4"]), tmp_path)
    taus = {line["step"]: line["tau"] for line in jsonl(tmp_path) if line["split"] == "train"}
    assert taus == {2: 5.0 * 0.5 ** 2, 4: 0.4, 5: 0.4}  # max(tau_final, tau_init * rate ** step)
    assert all("sparsity" in line for line in jsonl(tmp_path) if line["split"] == "train")


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    common = ["trainer.group_by_length=false", "adapter.lora_dropout=0.0", "+model.config.hidden_dropout_prob=0.0",
              "+model.config.attention_probs_dropout_prob=0.0", "trainer.eval_every_steps=1"]
    big = train_run(make(common + ["trainer.batch_size=8"]), tmp_path / "big")
    accum = train_run(make(common + ["trainer.batch_size=4", "trainer.grad_accum_steps=2"]), tmp_path / "accum")
    assert accum["global_step"] == big["global_step"] == 5
    assert accum["eval_loss"] == pytest.approx(big["eval_loss"], abs=1e-5)
    a = load_file(str(tmp_path / "big" / "checkpoints" / "step-00000005" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "accum" / "checkpoints" / "step-00000005" / "adapter.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)


def test_max_steps_overrides_epochs(tmp_path):
    metrics = train_run(make(["trainer.max_steps=7", "trainer.epochs=1"]), tmp_path)
    assert metrics["global_step"] == 7 and metrics["train_samples"] == 7 * 8  # 5 steps in epoch 0, 2 in epoch 1
    state = read_json(tmp_path / "checkpoints" / "step-00000007" / "trainer_state.json")["state"]
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)


def test_user_callbacks_from_the_config(tmp_path):
    metrics = train_run(make(["+trainer.callbacks.rec._target_=_trainer_helpers.Recorder"]), tmp_path)
    from _trainer_helpers import Recorder

    calls = Recorder.last.calls
    assert calls[0] == "on_train_begin" and calls[1] == "on_stage_begin"
    assert calls[-2:] == ["on_train_end", "on_run_end"]  # on_run_end: run.py, after the final metrics
    assert calls.count("on_step_end") == metrics["global_step"] == calls.count("on_step_begin")
    assert "on_evaluate" in calls and "on_stage_end" in calls


def test_named_checkpoints_are_kept_and_not_resumed_from(tmp_path):
    train_run(make(["+trainer.callbacks.stage._target_=_trainer_helpers.SaveStage", "trainer.save_every_steps=1",
                    "trainer.keep_last_checkpoints=1"]), tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["stage-train", "step-00000005"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005"]
    assert read_json(tmp_path / "checkpoints" / "stage-train" / "trainer_state.json")["state"]["global_step"] == 5
