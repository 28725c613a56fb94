"""Evaluation during training, best-checkpoint selection and early stopping, including an exact resume after a
kill. A scripted evaluation metric (tests/_best_helpers.py) decides which evaluation is the best."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _config import compose_config
from _trainer_helpers import jsonl, read_json, run_main, stderr_lines, without_timings
from safetensors.torch import load_file

from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError
from trainers.experiments.single import train_run

CONF = Path(__file__).resolve().parents[3] / "conf"
# 40 examples, batch 8: 5 steps per epoch
TINY = ["model=tiny-random-bert", "dataset.max_train_samples=40", "dataset.max_eval_samples=20",
        "trainer.batch_size=8", "trainer.eval_batch_size=16", "trainer.log_every_steps=5"]


def scripted(values):
    return [f"+trainer.callbacks.s={{_target_:tests._best_helpers.ScriptedMetric,values:[{','.join(map(str, values))}],"
            f"period:5}}", "trainer.metric_for_best=eval_scripted"]


def make(overrides):
    return compose_config(TINY + list(overrides))


pytestmark = pytest.mark.usefixtures("one_thread")  # small runs on one thread (conftest.py)


def test_eval_every_epochs(tmp_path):
    metrics = train_run(make(["trainer.epochs=3", "trainer.eval_every_epochs=1"]), tmp_path)
    assert [r["step"] for r in jsonl(tmp_path, "eval")] == [5, 10, 15]
    assert "best_step" not in metrics  # nothing selected unless asked
    train_run(make(["trainer.epochs=4", "trainer.eval_every_epochs=2"]), tmp_path / "two")
    assert [r["step"] for r in jsonl(tmp_path / "two", "eval")] == [10, 20]


def test_load_best_at_end_ends_with_the_best_evaluation(tmp_path):
    metrics = train_run(make(["trainer.epochs=4", "trainer.eval_every_epochs=1", "trainer.load_best_at_end=true",
                              *scripted([0.1, 0.9, 0.3, 0.2])]), tmp_path)
    lines = jsonl(tmp_path, "eval")
    assert [r["eval_scripted"] for r in lines] == [0.1, 0.9, 0.3, 0.2]
    best = lines[1]
    assert (metrics["best_step"], metrics["best_metric"], metrics["global_step"]) == (10, 0.9, 20)
    assert {k: metrics[k] for k in best if k not in ("step", "split")} == \
        {k: v for k, v in best.items() if k not in ("step", "split")}  # eval_loss, accuracy... of step 10
    saved = read_json(tmp_path / "metrics.json")
    assert saved["best_step"] == 10 and saved["eval_loss"] == best["eval_loss"]
    # the exported adapter is the best checkpoint's, not the last step's
    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    best_w = load_file(str(tmp_path / "checkpoints" / "best" / "adapter.safetensors"))
    last_w = load_file(str(tmp_path / "checkpoints" / "step-00000020" / "adapter.safetensors"))
    key = "bert.encoder.layer.0.attention.self.query.lora_B"
    assert torch.equal(exported[f"base_model.model.{key}.weight"], best_w[key])
    assert not torch.equal(best_w[key], last_w[key])


def test_lower_is_better_for_losses_and_the_best_can_be_the_last(tmp_path):
    metrics = train_run(make(["trainer.epochs=3", "trainer.eval_every_epochs=1", "trainer.load_best_at_end=true",
                              "trainer.metric_for_best=eval_loss", "trainer.base_lr=1e-2"]), tmp_path)
    lines = jsonl(tmp_path, "eval")
    best = min(lines, key=lambda r: r["eval_loss"])
    assert metrics["best_step"] == best["step"] and metrics["eval_loss"] == best["eval_loss"]


def test_early_stopping(tmp_path):
    metrics = train_run(make(["trainer.epochs=8", "trainer.eval_every_epochs=1",
                              "trainer.early_stopping_patience=2", *scripted([0.5, 0.4, 0.3, 0.9, 1.0])]), tmp_path)
    assert [r["step"] for r in jsonl(tmp_path, "eval")] == [5, 10, 15]
    assert (metrics["global_step"], metrics["stopped_early"], metrics["best_step"]) == (15, True, 5)
    assert metrics["eval_scripted"] == 0.3  # without load_best_at_end the run ends with its last weights
    assert (tmp_path / "checkpoints" / "step-00000015").is_dir()


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="early_stopping_patience needs periodic evaluation"):
        validate_config(make(["trainer.early_stopping_patience=2"]))
    with pytest.raises(UserError, match="continual"):
        validate_config(make(["dataset=clinc150_cl", "trainer.load_best_at_end=true"]))
    with pytest.raises(UserError, match=r"trainer.eval_every_epochs must be >= 0"):
        validate_config(make(["trainer.eval_every_epochs=-1"]))
    cfg = make(["trainer.load_best_at_end=true", "trainer.metric_for_best=eval_f1", "trainer.max_steps=2"])
    validate_config(cfg)
    with pytest.raises(UserError, match=r"metric_for_best=eval_f1 is not among the evaluation metrics"):
        train_run(cfg, tmp_path)


@pytest.mark.parametrize("kill_at", [7, 12])
def test_best_and_early_stopping_resume_exactly_after_a_kill(kill_at, tmp_path):
    """Killed after the best evaluation (step 10) was kept, or between two evaluations; resumed from the newest
    checkpoint (every 3 steps), the run stops at the same step with the same best step and metrics."""
    args = TINY + ["trainer.epochs=8", "trainer.eval_every_epochs=1", "trainer.early_stopping_patience=2",
                   "trainer.load_best_at_end=true", "trainer.save_every_steps=3", "adapter.lora_dropout=0.1",
                   *scripted([0.1, 0.9, 0.3, 0.2, 0.95])]
    whole = tmp_path / "whole"
    assert run_main(args + [f"hydra.run.dir={whole}"]).returncode == 0
    run = tmp_path / "killed"
    killed = run_main(args + [f"hydra.run.dir={run}",
                              f"+trainer.callbacks.kill={{_target_:tests._trainer_helpers.KillAt,step:{kill_at}}}"])
    assert killed.returncode != 0 and not (run / "metrics.json").exists()
    resumed = run_main(args + [f"hydra.run.dir={run}", "resume=auto"])
    assert resumed.returncode == 0, stderr_lines(resumed)
    a, b = read_json(whole / "metrics.json"), read_json(run / "metrics.json")
    assert without_timings(a) == without_timings(b)
    assert (a["global_step"], a["best_step"], a["stopped_early"]) == (20, 10, True)
    assert jsonl(whole, "eval") == jsonl(run, "eval")
    for name in ("adapter/adapter_model.safetensors", "checkpoints/best/adapter.safetensors"):
        wa, wb = load_file(str(whole / name)), load_file(str(run / name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
