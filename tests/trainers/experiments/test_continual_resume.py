"""A continual run resumes only with its own config, at task boundaries too (the same rule as single runs); a
refused resume leaves the run folder byte for byte as it was."""

from __future__ import annotations

import os
import signal

from _trainer_helpers import REPO, assert_one_line_error, read_json, run_main, snapshot

TINY_CL = ["dataset=clinc150_cl", "model=tiny-random-bert", "dataset.num_tasks=3", "dataset.max_train_per_class=4",
           "dataset.max_eval_per_class=2", "trainer.batch_size=16", "trainer.eval_batch_size=64", "trainer.epochs=1",
           "trainer.save_every_steps=2", "trainer.log_every_steps=2"]
TESTS_ON_PATH = {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}


def test_resume_at_a_task_boundary_checks_the_config(tmp_path):
    killed = run_main(TINY_CL + ["+trainer.callbacks.kill._target_=_fault_helpers.KillAtTaskStart",
                                 "+trainer.callbacks.kill.task=2", f"hydra.run.dir={tmp_path}"], **TESTS_ON_PATH)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "tasks" / "task_2").is_dir() and not (tmp_path / "tasks" / "task_2" / "checkpoints").exists()
    assert len(read_json(tmp_path / "continual_state.json")["tasks"]) == 2
    before = snapshot(tmp_path)

    changes = [("trainer.base_lr=0.05", "trainer.base_lr=0.001 -> 0.05"), ("adapter.r=4", "adapter.r=8 -> 4")]
    for override, diff in changes:
        refused = run_main(TINY_CL + [override, "resume=auto", f"hydra.run.dir={tmp_path}"])
        assert_one_line_error(refused, f"run {tmp_path} (after task 1) does not match this config: {diff}",
                              "repeat the original overrides")
        assert snapshot(tmp_path) == before  # no failed metrics.json, .hydra/ and main.log as they were

    resumed = run_main(TINY_CL + ["resume=auto", f"hydra.run.dir={tmp_path}"])
    assert resumed.returncode == 0, resumed.stderr
    assert read_json(tmp_path / "metrics.json")["status"] == "completed"
    assert "base_lr: 0.001" in (tmp_path / ".hydra" / "config.yaml").read_text()


def test_resume_inside_a_task_checks_that_tasks_checkpoint(tmp_path):
    killed = run_main(TINY_CL + ["+trainer.callbacks.kill._target_=tests._continual_helpers.KillInTask",
                                 "+trainer.callbacks.kill.task=0", "+trainer.callbacks.kill.step=3",
                                 f"hydra.run.dir={tmp_path}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # after the checkpoint of step 2
    before = snapshot(tmp_path)
    refused = run_main(TINY_CL + ["trainer.weight_decay=0.5", "resume=auto", f"hydra.run.dir={tmp_path}"])
    assert_one_line_error(refused, f"checkpoint {tmp_path / 'tasks' / 'task_0' / 'checkpoints'}",
                          "trainer.weight_decay=0.01 -> 0.5")
    assert snapshot(tmp_path) == before


def test_sigterm_in_a_continual_run_then_resume(tmp_path):
    proc = run_main(TINY_CL + ["+trainer.callbacks.term._target_=_fault_helpers.SignalAt",
                               "+trainer.callbacks.term.step=1", f"hydra.run.dir={tmp_path}"], **TESTS_ON_PATH)
    assert proc.returncode == 143, proc.stderr
    checkpoint = tmp_path / "tasks" / "task_0" / "checkpoints" / "step-00000002"  # seen at step 2's check
    assert read_json(tmp_path / "metrics.json") == {"status": "interrupted", "signal": "SIGTERM", "step": 2,
                                                    "checkpoint": str(checkpoint)}
    assert f"the run folder is {tmp_path}; continue with: python main.py " in proc.stderr
    resumed = run_main(TINY_CL + ["resume=auto", f"hydra.run.dir={tmp_path}"])
    assert resumed.returncode == 0, resumed.stderr
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["status"] == "completed" and [len(row) for row in metrics["acc_matrix"]] == [1, 2, 3]
