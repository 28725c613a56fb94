"""The optuna search (hparams_search=sora_optuna): a failed trial is a failed trial, the search goes on and the
sweep's summary.csv covers every trial."""

from __future__ import annotations

import csv

import pytest
import yaml
from _trainer_helpers import run_main

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


def test_failed_trial_is_reported_and_the_search_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_main(["-m", "hparams_search=sora_optuna", "model=tiny-random-bert", "dataset.max_train_samples=16",
                     "dataset.max_eval_samples=8", "trainer.batch_size=8", "hydra.sweeper.n_trials=3",
                     "+trainer.callbacks.fail._target_=tests._trainer_helpers.FailInJob",
                     "+trainer.callbacks.fail.job=1",
                     f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Failed experiment: job 1 failed: RuntimeError: planned failure in job 1" in output  # optuna's FAIL path
    with (sweep / "summary.csv").open(newline="") as fh:
        rows = {row["job"]: row for row in csv.DictReader(fh)}
    assert [rows[j]["status"] for j in ("0", "1", "2")] == ["completed", "failed", "completed"]
    assert rows["1"]["error"] == "planned failure in job 1" and rows["1"]["eval_accuracy"] == ""
    assert all(0.0 <= float(rows[j]["sparse_lambda"]) <= 1.0 for j in rows)  # from the shipped search space
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(float(rows[j]["eval_score"]) for j in ("0", "2"))


def test_search_config_maximises():
    from _config import compose_config

    cfg = compose_config(["hparams_search=sora_optuna"], hydra=True)
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.adapter.name == "sora"
    assert set(cfg.hydra.sweeper.params) == {"sparse_lambda", "adapter.gate_lr", "trainer.base_lr"}
