"""The experiment config group (paper settings in one option) and the GLUE table of a sweep."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from _config import compose_config
from _trainer_helpers import run_main

from trainers.cli.schemas import validate_config
from trainers.reports.sweep import seed_table, task_table

CONF = Path(__file__).resolve().parents[3] / "conf"


def make(overrides, hydra=False):
    return compose_config(list(overrides), hydra=hydra)


def test_sora_glue_has_the_official_settings():
    cfg = make(["experiment=sora_glue", "dataset=rte"])
    validate_config(cfg)
    a, t = cfg.adapter, cfg.trainer
    assert (cfg.model.name, a.name, a.r, a.lora_alpha, a.lora_dropout, a.gate_init, a.threshold_mode, a.l1_lambda,
            a.gate_lr, cfg.sparse_lambda) == ("deberta-v3-base", "sora", 8, 16, 0.0, "randn", "official", 10.0,
                                              8e-4, 3e-4)
    assert (t.epochs, t.batch_size, t.base_lr, t.warmup_ratio, t.weight_decay, t.max_grad_norm, t.eval_every_steps,
            t.load_best_at_end, t.metric_for_best, list(t.betas)) == (20, 8, 8e-4, 0.06, 0.1, 0.1, 1000, True,
                                                                      "eval_score", [0.9, 0.999])
    assert (cfg.dataset.max_seq_length, cfg.dataset.max_train_samples) == (128, None)
    params = make(["experiment=sora_glue"], hydra=True).hydra.sweeper.params
    assert params.seed == "0,21,42,81,100" and params.dataset == "cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte"


@pytest.mark.parametrize("name", ["lora_glue", "glue_cpu"])
def test_other_experiments_validate(name):
    cfg = make([f"experiment={name}", "dataset=mrpc"])
    validate_config(cfg)
    assert cfg.trainer.load_best_at_end and cfg.dataset.max_seq_length == 128
    validate_config(make([f"experiment={name}", "adapter=sora_official", "dataset=stsb"]))


def test_experiment_targets_wrap_six_linears_per_layer():
    from trainers.methods import get_method
    from trainers.models.loading import build_model

    cfg = make(["experiment=glue_cpu", "model=tiny-random-bert"])
    _, wrapped = build_model(cfg.model, get_method("lora").adapter_spec(cfg.adapter), 2)
    assert len(wrapped) == 12 and not any("pooler" in w for w in wrapped)  # 2 layers x (q, k, v, o, ffn in, out)


def test_task_table_layout():
    rows = []
    for adapter, scores in (("lora", {"rte": [0.60, 0.64], "cola": [0.30]}), ("sora", {"rte": [0.66], "cola": [0.2]})):
        for task, values in scores.items():
            for v in values:
                rows.append({"adapter": adapter, "dataset": task, "eval_score": v, "status": "completed",
                             "adapter_params": 1000, "nonzero_adapter_params": 700 if adapter == "sora" else None,
                             "wall_time_s": 60.0})
    rows.append({"adapter": "sora", "dataset": "rte", "eval_score": None, "status": "failed"})
    lines = task_table(rows).splitlines()
    assert lines[0].split() == ["method", "rte", "cola", "avg", "adapter", "params", "wall", "time"]
    lora, sora = lines[2], lines[3]
    assert lora.startswith("lora") and "62.00 ±2.83 (n=2)" in lora and "30.00" in lora and "46.00" in lora
    assert "1,000" in lora and "3.0 min" in lora
    assert sora.split()[:4] == ["sora", "66.00", "20.00", "43.00"] and "700" in sora
    assert task_table([r for r in rows if r["dataset"] == "rte"]) is None  # one task: no table


def test_seed_table_means_and_sample_std_per_setting():
    rows = [{"cl_method": m, "seed": s, "_swept": ["cl_method", "seed"], "status": "completed", "acc_final": acc,
             "active_adapters": act, "adapter_params": 100 * act, "wall_time_s": 60.0}
            for m, s, acc, act in (("gumbel", 0, 0.50, 6), ("gumbel", 1, 0.60, 8), ("joint", 0, 0.80, 1),
                                   ("joint", 1, 0.80, 1))]
    rows.append({"cl_method": "gumbel", "seed": 2, "_swept": ["cl_method", "seed"], "status": "failed"})
    lines = seed_table(rows).splitlines()
    assert lines[0].split() == ["cl_method", "n", "acc_final", "active_adapters", "adapter_params", "wall_time_s"]
    gumbel, joint = lines[2].split(), lines[3].split()
    # mean 0.55, sample std of (0.5, 0.6) = 0.0707; failed seed 2 left out of n
    assert gumbel == ["gumbel", "2", "0.5500", "±0.0707", "7.00", "±1.41", "700", "±141", "60", "±0"]
    assert joint[:4] == ["joint", "2", "0.8000", "±0.0000"]
    assert seed_table([r for r in rows if r.get("seed") == 0]) is None  # one seed: no table


def test_glue_cpu_sweep_gives_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_main(["-m", "experiment=glue_cpu", "model=tiny-random-bert", "dataset=rte,stsb",
                     "adapter=lora,sora_official", "seed=0", "dataset.max_train_samples=16",
                     "dataset.max_eval_samples=16", "trainer.epochs=1", "trainer.batch_size=8",
                     f"hydra.sweep.dir={sweep}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    assert {r["dataset"] for r in rows} == {"rte", "stsb"} and all(r["eval_score"] for r in rows)
    assert all(r["eval_pearson"] for r in rows if r["dataset"] == "stsb")
    assert all(r["nonzero_adapter_params"] for r in rows if r["adapter"] == "sora_official")
    assert "eval_score x 100 by method and task" in proc.stdout
    table = proc.stdout.split("eval_score x 100 by method and task")[1].splitlines()
    assert any(line.startswith("lora ") for line in table) and any(line.startswith("sora_official") for line in table)
