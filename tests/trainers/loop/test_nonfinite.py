"""Non-finite guard: a NaN/inf loss, gradient norm, weight or evaluation loss never ends as ``completed``; no
checkpoint or export with a non-finite tensor is written; ``trainer.on_nonfinite=skip_step`` drops the update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _config import compose_config
from _trainer_helpers import TINY as CLI_TINY
from _trainer_helpers import read_json, run_main, stderr_lines
from safetensors.torch import load_file

from trainers.core.errors import NonFiniteError, UserError
from trainers.experiments.single import train_run
from trainers.loop.checkpoint import list_checkpoints

CONF = Path(__file__).resolve().parents[3] / "conf"
TINY = ["model=tiny-random-bert", "dataset.max_train_samples=48", "dataset.max_eval_samples=16",
        "trainer.batch_size=8", "trainer.eval_batch_size=16", "trainer.log_every_steps=1"]


def make(overrides: list[str]):
    return compose_config(TINY + list(overrides))


pytestmark = pytest.mark.usefixtures("one_thread")  # small runs on one thread (conftest.py)


def assert_checkpoints_finite(run_dir: Path) -> None:
    for checkpoint in list_checkpoints(run_dir):
        for name, tensor in load_file(str(checkpoint / "adapter.safetensors")).items():
            assert torch.isfinite(tensor).all(), f"{checkpoint.name}: {name}"


@pytest.mark.parametrize("adapter", ["lora", "sora"])
def test_diverging_run_fails_with_one_line_and_keeps_the_last_good_checkpoint(adapter, tmp_path):
    """The issue's case: lr 1e6 used to exit 0 with status completed and NaN checkpoints and export."""
    proc = run_main(CLI_TINY + [f"adapter={adapter}", "trainer.epochs=3", "trainer.save_every_steps=1",
                                "trainer.base_lr=1e6", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 1, proc.stderr
    lines = stderr_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error: training stopped at step "), proc.stderr
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["status"] == "failed" and metrics["reason"].startswith("non-finite")
    step = metrics["step"]
    assert f"at step {step}:" in lines[0]
    checkpoints = list_checkpoints(tmp_path)
    assert checkpoints and checkpoints[-1].name == f"step-{step - 1:08d}"  # every step before the bad one saved
    assert f"the last good checkpoint is {checkpoints[-1]}" in lines[0]
    assert_checkpoints_finite(tmp_path)
    assert not (tmp_path / "adapter").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_nan_loss_stops_before_the_update(tmp_path):
    cfg = make(["+trainer.callbacks.nan._target_=_fault_helpers.NanLossAt", "+trainer.callbacks.nan.steps=[3]",
                "trainer.save_every_steps=1"])
    with pytest.raises(NonFiniteError) as info:
        train_run(cfg, tmp_path)
    assert info.value.details == {"step": 3, "reason": "non-finite loss term poison"}
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]  # nothing was logged for the bad step


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])  # clip_grad_norm_'s norm, or the guard's own
def test_nan_gradient_with_a_finite_loss_stops(max_grad_norm, tmp_path):
    cfg = make(["+trainer.callbacks.nan._target_=_fault_helpers.NanGradAt", "+trainer.callbacks.nan.step=2",
                f"trainer.max_grad_norm={max_grad_norm}"])
    with pytest.raises(NonFiniteError) as info:
        train_run(cfg, tmp_path)
    assert info.value.details == {"step": 2, "reason": "non-finite gradient norm"}
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "adapter").exists()


def test_skip_step_drops_the_update_and_finishes(tmp_path):
    from _fault_helpers import NanLossAt

    cfg = make(["+trainer.callbacks.nan._target_=_fault_helpers.NanLossAt", "+trainer.callbacks.nan.steps=[2,4]",
                "trainer.on_nonfinite=skip_step", "trainer.max_skipped_steps=2"])
    result = train_run(cfg, tmp_path)
    assert result["status"] == "completed" and result["skipped_steps"] == 2 and result["global_step"] == 6
    assert read_json(tmp_path / "metrics.json")["skipped_steps"] == 2
    poison = NanLossAt.last
    for step in (2, 4):  # the weights after a skipped step are exactly those before it
        assert poison.before[step].keys() == poison.after[step].keys()
        for name, before in poison.before[step].items():
            assert torch.equal(before, poison.after[step][name]), name
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["split"] == "train"]
    assert [line["step"] for line in train] == [1, 2, 3, 4, 5, 6]
    assert all(line["loss"] is not None for line in train)  # the skipped steps' NaN stays out of the means
    assert all(line.get("poison") is None for line in train)


def test_skip_step_stops_beyond_the_tolerated_count(tmp_path):
    cfg = make(["+trainer.callbacks.nan._target_=_fault_helpers.NanLossAt", "+trainer.callbacks.nan.steps=[2,3,5]",
                "trainer.on_nonfinite=skip_step", "trainer.max_skipped_steps=2"])
    with pytest.raises(NonFiniteError, match="2 step\\(s\\) were skipped already") as info:
        train_run(cfg, tmp_path)
    assert info.value.details["step"] == 5


def test_nan_evaluation_loss_is_a_failure(tmp_path):
    cfg = make(["+trainer.callbacks.nan._target_=_fault_helpers.NanEvalLoss"])
    with pytest.raises(NonFiniteError, match="non-finite evaluation aux_loss=nan"):
        train_run(cfg, tmp_path)
    assert not list_checkpoints(tmp_path) and not (tmp_path / "metrics.json").exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    cfg = make(["+trainer.callbacks.nan._target_=_fault_helpers.PoisonWeightsAt", "+trainer.callbacks.nan.step=2",
                "trainer.save_every_steps=1"])
    with pytest.raises(NonFiniteError, match="training stopped at step 2: non-finite weights in ") as info:
        train_run(cfg, tmp_path)
    assert info.value.details["step"] == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert_checkpoints_finite(tmp_path)


def test_non_finite_weights_are_never_exported(tmp_path):
    cfg = make(["+trainer.callbacks.nan._target_=_fault_helpers.PoisonAtRunEnd"])
    with pytest.raises(NonFiniteError, match="not exporting the adapter"):
        train_run(cfg, tmp_path)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()
    assert_checkpoints_finite(tmp_path)


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite must be one of stop, skip_step (got 'ignore')"),
    ("trainer.max_skipped_steps=-1", "trainer.max_skipped_steps must be >= 0 (got -1)"),
])
def test_policy_values_are_checked(override, message):
    from trainers.cli.schemas import validate_config

    with pytest.raises(UserError, match=message.replace("(", "\\(").replace(")", "\\)")):
        validate_config(make([override]))


def test_disk_full_is_one_line(tmp_path):
    """A full disk: one line saying so (no logging tracebacks), the run recorded as failed where possible."""
    from _trainer_helpers import REPO

    proc = run_main(CLI_TINY + ["+trainer.callbacks.full._target_=_fault_helpers.DiskFullAt",
                                "+trainer.callbacks.full.step=2", f"hydra.run.dir={tmp_path}"],
                    PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    assert proc.returncode == 1
    lines = stderr_lines(proc)
    assert lines == [f"error: no space left on device while writing {tmp_path / 'checkpoints'}; free some space, "
                     f"then continue with resume=auto and the same hydra.run.dir (checkpoints are written "
                     f"atomically: the last complete one is kept)"], proc.stderr
    assert read_json(tmp_path / "metrics.json")["status"] == "failed"


def test_a_stopped_run_resumes_past_the_bad_step_with_skip_step(tmp_path):
    """The workflow the error message suggests: the run stopped at a bad step, the last good checkpoint is kept;
    resuming it with trainer.on_nonfinite=skip_step (a key that may change on resume) skips that step and ends."""
    poison = ["+trainer.callbacks.nan._target_=_fault_helpers.NanLossAt", "+trainer.callbacks.nan.steps=[3]",
              "trainer.save_every_steps=1"]
    with pytest.raises(NonFiniteError):
        train_run(make(poison), tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "step-00000002"
    result = train_run(make(poison + ["trainer.on_nonfinite=skip_step", "resume=auto"]), tmp_path)
    assert result["status"] == "completed" and result["global_step"] == 6 and result["skipped_steps"] == 1
    assert read_json(tmp_path / "metrics.json")["status"] == "completed"
    assert_checkpoints_finite(tmp_path)
