"""The options of the official SoRA code (gate_init=randn, an lr-independent threshold, l1_lambda) and the
sweep-level accuracy-vs-sparsity plot."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from _config import compose_config
from _sora_helpers import THRESHOLDS_FILE
from _trainer_helpers import TINY, read_json, run_main
from torch import nn

from adapters import SoraLinear
from trainers.methods import get_method
from trainers.methods.sora import GateL1Loss, SoraGates
from trainers.methods.sora_report import SWEEP_PNG, SoraFinish, SoraStageReport, plot_sweep, read_stages_csv

make = compose_config


def test_defaults_follow_the_seed():
    adapter = make(["adapter=sora"]).adapter
    assert (adapter.gate_init, adapter.threshold_mode, adapter.l1_lambda) == ("ones", "lr_scaled", 0.0)
    hooks = get_method("sora").callbacks(make(["adapter=sora"]))
    assert [type(h) for h in hooks] == [SoraGates, SoraStageReport, SoraFinish]  # no L1 term unless asked for
    hooks = get_method("sora").callbacks(make(["adapter=sora", "adapter.l1_lambda=0.1"]))
    assert [type(h) for h in hooks] == [SoraGates, GateL1Loss, SoraStageReport, SoraFinish]


def test_gate_l1_loss_is_lambda_times_the_mean_over_all_gate_entries():
    model = nn.Sequential(SoraLinear(nn.Linear(4, 4), r=2, lora_alpha=2),
                          SoraLinear(nn.Linear(4, 4), r=6, lora_alpha=6))
    with torch.no_grad():
        model[0].gate.copy_(torch.tensor([1.0, -3.0]))
        model[1].gate.fill_(0.5)
    loss = GateL1Loss(0.4).extra_losses(SimpleNamespace(model=model), None, {})["gate_l1"]
    # (1 + 3 + 6 * 0.5) / 8 entries = 0.875 (a mean of layer means would be 1.25, the sum 7)
    assert loss.item() == pytest.approx(0.4 * 0.875)
    loss.backward()
    assert torch.allclose(model[0].gate.grad, 0.4 * torch.tensor([1.0, -1.0]) / 8)
    assert torch.allclose(model[1].gate.grad, torch.full((6,), 0.4 / 8))


def test_gate_init_randn_reaches_the_model():
    from trainers.models.loading import build_model

    for init in ("ones", "randn"):
        cfg = make(["adapter=sora", "model=tiny-random-bert", f"adapter.gate_init={init}"])
        torch.manual_seed(0)
        model, _ = build_model(cfg.model, get_method("sora").adapter_spec(cfg.adapter), 2)
        gates = torch.cat([p.detach() for n, p in model.named_parameters() if n.endswith(".gate")])
        assert gates.numel() == 13 * 8
        if init == "ones":
            assert torch.equal(gates, torch.ones_like(gates))
        else:
            assert abs(gates.mean()) < 0.3 and 0.7 < gates.std() < 1.3 and (gates < 0).any()


def test_official_code_options_in_a_run(tmp_path):
    """threshold_mode=soft_absolute: the soft-threshold is xi itself, whatever the lr; l1_lambda adds l1 * mean|g|."""
    proc = run_main(TINY + ["adapter=sora", "schedule=xi_stages", "schedule.xi_max=0.02", "schedule.xi_step=0.01",
                            "schedule.max_steps_per_stage=2", "adapter.threshold_mode=soft_absolute",
                            "adapter.l1_lambda=0.5", "trainer.log_every_steps=1",
                            "+trainer.callbacks.thresholds._target_=tests._sora_helpers.ThresholdLog",
                            f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / THRESHOLDS_FILE).read_text().splitlines()]
    assert [(r["sparse_lambda"], r["threshold"]) for r in records] == \
        [(0.0, 0.0)] * 2 + [(0.01, 0.01)] * 2 + [(0.02, 0.02)] * 2
    assert len({r["lr"] for r in records}) > 1  # the lr changed, the threshold did not follow it
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"split": "train"' in line]
    assert train[0]["gate_l1"] == pytest.approx(0.5)  # gates start at 1: 0.5 * mean|1| = 0.5
    assert all(0 < r["gate_l1"] <= 0.5 + 1e-6 for r in train)
    assert len(read_stages_csv(tmp_path / "stages.csv")) == 3


def test_sweep_over_sparse_lambda_gets_one_plot(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_main(["-m", *TINY, "adapter=sora", "adapter.gate_lr=0.3", "trainer.max_steps=4",
                     "sparse_lambda=0.0,4.0", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr
    assert f"Accuracy vs sparsity plot: {sweep / SWEEP_PNG}" in proc.stdout
    import matplotlib.image

    assert matplotlib.image.imread(sweep / SWEEP_PNG).shape[1] > 400
    for job, lam in (("0", 0.0), ("1", 4.0)):
        rows = read_stages_csv(sweep / job / "stages.csv")  # a constant schedule is one stage ...
        assert [(r["stage"], r["xi"]) for r in rows] == [(0, lam)]
        assert not any(p.name.startswith("stage-") for p in (sweep / job / "checkpoints").iterdir())  # ... no copy
        metrics = read_json(sweep / job / "metrics.json")
        assert metrics["nonzero_adapter_params"] == rows[0]["nonzero_adapter_params"]
    assert read_json(sweep / "1" / "metrics.json")["gate_zero_ratio"] > 0


def test_plot_sweep_skips_jobs_without_sora_metrics(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "metrics.json").write_text(json.dumps({"status": "completed", "eval_accuracy": 0.8}))
    rows = [{"job": "0", "_swept": ["adapter"], "adapter": "lora"}, {"job": "1", "_swept": ["adapter"]}]
    assert plot_sweep(tmp_path, rows) is None and not (tmp_path / SWEEP_PNG).exists()


def test_sweep_plot_labels_are_short_and_points_sorted(tmp_path, monkeypatch):
    import trainers.methods.sora_report as report

    for job, ratio in (("0", 0.5), ("1", 0.1)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "metrics.json").write_text(json.dumps(
            {"status": "completed", "eval_accuracy": 0.8, "gate_zero_ratio": ratio, "nonzero_adapter_params": 10}))
    rows = [{"job": "0", "_swept": ["sparse_lambda", "adapter.gate_lr"], "sparse_lambda": "0.30000000000000004",
             "adapter.gate_lr": 0.001},
            {"job": "1", "_swept": ["sparse_lambda", "adapter.gate_lr"], "sparse_lambda": 0.1,
             "adapter.gate_lr": 0.001}]
    seen = {}
    monkeypatch.setattr(report, "plot_curve", lambda points, labels, path, title, sort_by_x=False: seen.update(
        labels=list(labels), sort=sort_by_x) or path)
    report.plot_sweep(tmp_path, rows)
    assert seen == {"labels": ["sparse_lambda=0.3", "sparse_lambda=0.1"], "sort": True}  # gate_lr does not vary
    assert report.short_value(1e-05) == "1e-05" and report.short_value("lora") == "lora"
