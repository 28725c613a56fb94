"""A run killed with SIGKILL and resumed with resume=auto ends exactly like the uninterrupted run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from _trainer_helpers import TINY, read_json, run_main, without_timings

# SoRA with gates that really go to zero, dropout on, gradient accumulation, evaluation and logging
# at steps that are not checkpoint steps: everything a resume has to get right. 2 epochs of 6 steps.
ARGS = TINY + ["adapter=sora", "sparse_lambda=3", "adapter.gate_lr=0.05", "adapter.lora_dropout=0.1",
               "trainer.epochs=2", "trainer.batch_size=4", "trainer.grad_accum_steps=2",
               "trainer.save_every_steps=4", "trainer.eval_every_steps=5", "trainer.log_every_steps=3"]
KILL = "+trainer.callbacks.kill._target_=tests._trainer_helpers.KillAt"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    proc = run_main(ARGS + [f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["global_step"] == 12 and metrics["gate_zero_ratio"] > 0
    return run_dir


@pytest.mark.parametrize(("step", "where"), [
    (6, "step_end"),     # after an optimizer step, before its logging: resumes from step 4, replays 5 and 6
    (8, "step_begin"),   # right after the checkpoint of step 8 (and the epoch boundary at 6)
    (9, "mid_step"),     # halfway through accumulating step 10's gradients, in the second epoch
])
def test_sigkill_then_resume_equals_uninterrupted(uninterrupted, tmp_path, step, where):
    killed = run_main(ARGS + [KILL, f"+trainer.callbacks.kill.step={step}", f"+trainer.callbacks.kill.where={where}",
                              f"hydra.run.dir={tmp_path}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "metrics.json").exists()
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints[-1] == f"step-{(step // 4) * 4:08d}"
    (tmp_path / "checkpoints" / ".tmp-step-00000099").mkdir()  # as a kill during a checkpoint write leaves it

    resumed = run_main(ARGS + ["resume=auto", f"hydra.run.dir={tmp_path}"])
    assert resumed.returncode == 0, resumed.stderr
    assert without_timings(read_json(tmp_path / "metrics.json")) == \
        without_timings(read_json(uninterrupted / "metrics.json"))
    assert (tmp_path / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (uninterrupted / "adapter" / "adapter_model.safetensors").read_bytes()
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000099").exists()


def test_resume_auto_without_checkpoint_starts_from_scratch(uninterrupted, tmp_path):
    proc = run_main(ARGS + ["resume=auto", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    assert without_timings(read_json(tmp_path / "metrics.json")) == \
        without_timings(read_json(uninterrupted / "metrics.json"))
