"""`python main.py` on continual datasets: a tiny 3-task run end to end, exact resume across and inside tasks,
the image path (tiny random ViT on MNIST), joint training, bad values, and the sweep table."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
from _trainer_helpers import assert_one_line_error, read_json, run_main
from safetensors.torch import load_file

# 3 CLINC150 domains, 6 train / 4 eval examples per intent, a tiny random BERT: a few seconds per task
TINY_CL = ["dataset=clinc150_cl", "model=tiny-random-bert", "dataset.num_tasks=3", "dataset.max_train_per_class=6",
           "dataset.max_eval_per_class=4", "trainer.batch_size=16", "trainer.eval_batch_size=64", "trainer.epochs=2",
           "trainer.save_every_steps=3", "trainer.log_every_steps=2"]
GUMBEL = TINY_CL + ["adapter=gumbel", "adapter.anneal_rate=0.9", "adapter.lambda_sparsity=0.5",
                    "adapter.growth_threshold=0.34"]
KILL = "+trainer.callbacks.kill._target_=tests._continual_helpers.KillInTask"
TIMINGS = ("wall_time_s", "train_time_s")


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def gumbel_run(tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("gumbel")
    proc = run_main(GUMBEL + [f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    return run_dir, (run_dir / "main.log").read_text()


def test_three_task_run_writes_the_field_metrics(gumbel_run):
    run_dir, log = gumbel_run
    metrics = read_json(run_dir / "metrics.json")
    matrix = metrics["acc_matrix"]
    assert [len(row) for row in matrix] == [1, 2, 3] and metrics["status"] == "completed"
    assert metrics["acc_final"] == pytest.approx(sum(matrix[-1]) / 3)  # every task has 15 x 4 eval examples
    assert metrics["aaa"] == pytest.approx(sum(sum(r) / len(r) for r in matrix) / 3)
    assert metrics["forgetting"] == pytest.approx((max(matrix[0][0], matrix[1][0], matrix[2][0]) - matrix[2][0]
                                                   + max(matrix[1][1], matrix[2][1]) - matrix[2][1]) / 2)
    assert metrics["bwt"] == pytest.approx((matrix[2][0] - matrix[0][0] + matrix[2][1] - matrix[1][1]) / 2)
    assert metrics["eval_accuracy"] == metrics["acc_final"] and metrics["total_adapters"] == 3
    masks = [torch.load(run_dir / f"beta_values_task_{t}.pt", weights_only=True) for t in range(3)]
    assert [len(m["beta_values"]) for m in masks] == [1, 2, 3]
    for t, m in enumerate(masks):
        assert float(m["beta_values"].sum()) == pytest.approx(1.0, abs=1e-5)  # the gate before the decision
        assert m["growth_score"] == "contribution" and len(m["scores"]) == t + 1
        assert bool(m["pruning_mask"][t]) == (t == 0 or float(m["scores"][t]) > 0.34)
    assert metrics["active_adapters"] == int(masks[-1]["pruning_mask"].sum())
    for name in ("accuracy_over_tasks.png", "accuracy_matrix.png", "beta_evolution.png", "beta_heatmap.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    for t in range(3):  # each task's own training curves
        assert (run_dir / "tasks" / f"task_{t}" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "[Conditional Growth] Task 2 - Beta values: [" in log
    assert "Active adapters: " in log and "Task 1, Epoch 2/2 => Loss " in log and "(clf=" in log
    assert ", tau=" in log and "sparse=" in log
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["task"] for line in lines] == [0, 1, 2] and lines[2]["acc_row"] == matrix[2]


def test_frozen_directions_do_not_change_in_later_tasks(gumbel_run):
    run_dir, _ = gumbel_run
    after0 = load_file(str(run_dir / "tasks" / "task_0" / "final_adapter.safetensors"))
    after2 = load_file(str(run_dir / "tasks" / "task_2" / "final_adapter.safetensors"))
    keys = [k for k in after0 if k.endswith((".lora_A.0", ".lora_B.0"))]
    assert keys and all(torch.equal(after0[k], after2[k]) for k in keys)
    assert any(not torch.equal(after0[k], after2[k]) for k in after0 if k.endswith("magnitudes"))  # alphas train
    key = keys[0].rsplit(".lora_", 1)[0]
    a, b = after2[f"{key}.lora_A.0"], after2[f"{key}.lora_B.0"]
    assert float(after2[f"{key}.direction_scale"][0]) == pytest.approx(1.0 / float(a.norm() * b.norm()), rel=1e-5)


@pytest.mark.parametrize(("task", "step"), [(1, 2), (2, -1)])  # inside task 1; at the end of task 2's training
def test_killed_and_resumed_equals_uninterrupted(gumbel_run, tmp_path, task, step):
    full, _ = gumbel_run
    killed = run_main(GUMBEL + [KILL, f"+trainer.callbacks.kill.task={task}", f"+trainer.callbacks.kill.step={step}",
                                f"hydra.run.dir={tmp_path}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "metrics.json").exists()
    refused = run_main(GUMBEL + [f"hydra.run.dir={tmp_path}"])
    assert refused.returncode == 1 and "already holds results" in refused.stderr
    resumed = run_main(GUMBEL + ["resume=auto", f"hydra.run.dir={tmp_path}"])
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(read_json(tmp_path / "metrics.json")) == comparable(read_json(full / "metrics.json"))
    for t in range(3):
        mine, theirs = (torch.load(d / f"beta_values_task_{t}.pt", weights_only=True) for d in (tmp_path, full))
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(v, theirs[k]) if torch.is_tensor(v) else v == theirs[k] for k, v in mine.items())
    assert (tmp_path / "adapter" / "adapter_state.safetensors").read_bytes() == \
        (full / "adapter" / "adapter_state.safetensors").read_bytes()


def test_image_path_tiny_vit_on_mnist(tmp_path):
    proc = run_main(["dataset=mnist_cl", "model=tiny-random-vit", "adapter=gumbel", "dataset.num_tasks=2",
                     "dataset.max_train_per_class=32", "dataset.max_eval_per_class=16", "trainer.batch_size=16",
                     "trainer.epochs=3", "trainer.base_lr=5e-3", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    metrics = read_json(tmp_path / "metrics.json")
    assert [len(r) for r in metrics["acc_matrix"]] == [1, 2] and metrics["total_adapters"] == 2
    assert all(0.0 <= a <= 1.0 for r in metrics["acc_matrix"] for a in r)
    # after task 0 (digits 0 and 1, 12 steps) the tiny random ViT is well above chance (0.5) on them
    assert metrics["acc_matrix"][0][0] > 0.6


def test_joint_training_is_one_task_tested_per_task_and_the_sweep_table(tmp_path):
    proc = run_main(["-m", *TINY_CL, "+cl_method=joint,seq_lora", "trainer.epochs=1",
                     f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    joint, seq = read_json(tmp_path / "0" / "metrics.json"), read_json(tmp_path / "1" / "metrics.json")
    assert joint["joint"] and len(joint["acc_matrix"]) == 1 and len(joint["acc_matrix"][0]) == 3
    assert joint["forgetting"] == 0.0 and joint["aaa"] == joint["acc_final"]
    assert not seq["joint"] and [len(r) for r in seq["acc_matrix"]] == [1, 2, 3]
    assert joint["adapter_params"] == seq["adapter_params"] > 0 and seq["active_adapters"] == 1
    with (tmp_path / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["cl_method"] for r in rows] == ["joint", "seq_lora"]
    for row, metrics in zip(rows, (joint, seq), strict=True):
        for key in ("acc_final", "aaa", "forgetting", "bwt", "active_adapters", "adapter_params"):
            assert float(row[key]) == pytest.approx(metrics[key])
    assert "aaa" in proc.stdout and "forgetting" in proc.stdout and "bwt" in proc.stdout


@pytest.mark.parametrize(("override", "message"), [
    ("dataset.loss_classes=all", "dataset.loss_classes must be current or seen (got 'all')"),
    ("dataset.classes_per_task=7", "dataset.classes_per_task=7 does not divide the 150 classes"),
    ("dataset.num_taks=2", "unknown config key 'dataset.num_taks'"),
    ("model=tiny-random-vit", "dataset clinc150_cl holds text data but model tiny-random-vit takes images"),
])
def test_bad_values_fail_with_one_line(tmp_path, override, message):
    proc = run_main(TINY_CL + [override, f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 1
    assert_one_line_error(proc, message)


def test_global_gate_run_resumes_exactly_inside_a_task(tmp_path):
    """adapter.gate=global (one shared gate, anneal_rate null: tau reaches tau_final at each task's end)."""
    args = TINY_CL + ["adapter=gumbel", "adapter.gate=global", "adapter.lambda_sparsity=0.5",
                      "adapter.growth_threshold=0.34"]
    full, killed_dir = tmp_path / "full", tmp_path / "killed"
    proc = run_main(args + [f"hydra.run.dir={full}"])
    assert proc.returncode == 0, proc.stderr
    log = (full / "main.log").read_text()
    assert "Task 2, Epoch 2/2 =>" in log and ", tau=0.500" in log  # the last epoch ends at tau_final
    masks = [torch.load(full / f"beta_values_task_{t}.pt", weights_only=True) for t in range(3)]
    assert all(torch.equal(m["layer_beta_values"][0], m["layer_beta_values"][-1]) for m in masks)  # one gate
    killed = run_main(args + [KILL, "+trainer.callbacks.kill.task=1", "+trainer.callbacks.kill.step=2",
                              f"hydra.run.dir={killed_dir}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_main(args + ["resume=auto", f"hydra.run.dir={killed_dir}"])
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(read_json(killed_dir / "metrics.json")) == comparable(read_json(full / "metrics.json"))
    assert (killed_dir / "adapter" / "adapter_state.safetensors").read_bytes() == \
        (full / "adapter" / "adapter_state.safetensors").read_bytes()
