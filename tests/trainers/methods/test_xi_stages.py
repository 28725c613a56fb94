"""schedule=xi_stages (SoRA Algorithm 1): the stage list, per-stage thresholds and bookkeeping, the curve files,
resume inside a stage, and the end-of-run prune / PEFT / merged exports of a trained model."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from _config import REPO, compose_config
from _sora_helpers import THRESHOLDS_FILE
from _trainer_helpers import TINY, read_json, run_main, without_timings
from omegaconf import OmegaConf

from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError
from trainers.loop.stages import Stage
from trainers.methods.schedules import build_stages, xi_values
from trainers.methods.sora_report import COLUMNS, EXPORT_JSON, read_stages_csv

STEPS = 4  # optimizer steps per stage in the runs below
GATE_LR = 0.3
# 3 stages (xi 0, 0.5, 1.0) of 4 steps, a gate lr large enough that gates reach 0, checkpoints every 3 steps
ARGS = TINY + ["adapter=sora", "schedule=xi_stages", "schedule.xi_max=1.0", "schedule.xi_step=0.5",
               f"schedule.max_steps_per_stage={STEPS}", f"adapter.gate_lr={GATE_LR}", "trainer.batch_size=4",
               "trainer.log_every_steps=1", "trainer.save_every_steps=3", "adapter.gate_warmup_ratio=0",
               "trainer.save_merged=true"]
THRESHOLDS = ["+trainer.callbacks.thresholds._target_=tests._sora_helpers.ThresholdLog"]
KILL = "+trainer.callbacks.kill._target_=tests._trainer_helpers.KillAt"
TIME_COLUMNS = ("stage_time_s", "wall_time_s")


make = compose_config


# --------------------------------------------------------------------------------------------- stage list
def test_xi_values_are_float_safe():
    assert xi_values(0.0, 0.5, 0.1) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    naive, x = [], 0.0  # what repeated addition gives: 0.30000000000000004, ... and a missing or extra stage
    while x <= 0.3:
        naive.append(x)
        x += 0.1
    assert len(naive) == 3 and xi_values(0.0, 0.3, 0.1) == [0.0, 0.1, 0.2, 0.3]
    assert xi_values(0.2, 0.2, 0.1) == [0.2]
    assert xi_values(0.1, 0.35, 0.1) == [0.1, 0.2, 0.3]  # xi_max is an upper bound, not always hit
    with pytest.raises(ValueError, match="more than 1000"):
        xi_values(0.0, 1.0, 1e-4)
    with pytest.raises(ValueError, match="xi_step > 0"):
        xi_values(0.0, 0.5, 0.0)


def test_default_schedule_is_six_stages_of_three_epochs():
    cfg = make(["schedule=xi_stages"])
    assert cfg.adapter.name == "sora"  # the schedule selects SoRA unless adapter=... is given
    validate_config(cfg)
    stages = build_stages(cfg)
    assert [s.params["sparse_lambda"] for s in stages] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert [s.name for s in stages] == ["0-xi0", "1-xi0.1", "2-xi0.2", "3-xi0.3", "4-xi0.4", "5-xi0.5"]
    # the seed's Algorithm 1 rebuilds both optimizers at every stage
    assert all(s == Stage(s.name, 3, None, {"sparse_lambda": s.params["sparse_lambda"]}, True) for s in stages)
    stages = build_stages(make(["adapter=sora", "schedule=xi_stages", "schedule.max_steps_per_stage=7",
                                "schedule.reset_optimizers=false", "sparse_lambda=0.9"]))
    assert {(s.max_steps, s.reset_optimizers) for s in stages} == {(7, False)}
    assert max(s.params["sparse_lambda"] for s in stages) == 0.5  # the top-level sparse_lambda plays no part


@pytest.mark.parametrize(("overrides", "message"), [
    (["adapter=lora"], "schedule=xi_stages schedules SoRA's gate sparsity; it needs adapter=sora"),
    (["adapter=sora", "schedule.xi_step=0"], "schedule.xi_start/xi_max/xi_step must satisfy"),
    (["adapter=sora", "schedule.xi_max=-1"], "schedule.xi_start/xi_max/xi_step must satisfy"),
    (["adapter=sora", "schedule.xi_step=1e-5"], "more than 1000"),
    (["adapter=sora", "schedule.epochs_per_stage=0"], "schedule.epochs_per_stage or schedule.max_steps_per_stage"),
    (["adapter=sora", "+schedule.xi_stop=1"], "unknown config key 'schedule.xi_stop'"),
])
def test_bad_schedule_values_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        validate_config(make(["schedule=xi_stages", *overrides]))


def test_bad_schedule_value_exits_with_one_line(tmp_path):
    proc = run_main(TINY + ["adapter=sora", "schedule=xi_stages", "schedule.xi_step=0", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: schedule.xi_start/xi_max/xi_step must satisfy 0 <= xi_start <= xi_max and xi_step > 0 "
        "(got 0.0, 0.5, 0.0)"]
    assert read_json(tmp_path / "metrics.json")["status"] == "failed"
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------------------------- a full run
@pytest.fixture(scope="module")
def staged_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("xi")
    proc = run_main(ARGS + THRESHOLDS + [f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_every_stage_thresholds_with_its_xi_and_a_fresh_lr_schedule(staged_run):
    records = [json.loads(line) for line in (staged_run / THRESHOLDS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 3 * STEPS + 1))
    for r in records:
        xi = [0.0, 0.5, 1.0][r["stage"]]
        # fresh linear decay per stage (no warmup): lr = gate_lr * (steps - k) / steps before the k-th step
        k = r["stage_step"] - 1
        assert r["sparse_lambda"] == xi and r["threshold_mode"] == "lr_scaled"
        assert r["lr"] == pytest.approx(GATE_LR * (STEPS - k) / STEPS)
        assert r["threshold"] == pytest.approx(xi * r["lr"])
    train = [json.loads(line) for line in (staged_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["sparse_lambda"] for r in train if r["split"] == "train"] == [0.0] * 4 + [0.5] * 4 + [1.0] * 4


def test_stages_csv_records_each_stage(staged_run):
    rows = read_stages_csv(staged_run / "stages.csv")
    header = (staged_run / "stages.csv").read_text().splitlines()[0]
    assert header == ",".join(COLUMNS)
    assert [(r["stage"], r["xi"], r["step"]) for r in rows] == [(0, 0.0, 4), (1, 0.5, 8), (2, 1.0, 12)]
    evals = {r["step"]: r for r in map(json.loads, (staged_run / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "eval"}
    widths = {}  # in + out features of every wrapped layer of the tiny BERT (hidden 32, intermediate 64)
    for name in rows[0]["effective_ranks"]:
        widths[name] = 32 + 64 if name.endswith(("intermediate.dense", "output.dense")) and ".attention." not in name \
            else 64
    for row in rows:
        ev = evals[row["step"]]
        assert (row["eval_accuracy"], row["eval_loss"], row["gate_zero_ratio"]) == \
            (ev["eval_accuracy"], ev["eval_loss"], ev["gate_zero_ratio"])
        ranks = row["effective_ranks"]
        assert len(ranks) == 13 and all(0 <= r <= 8 for r in ranks.values())
        assert row["gate_zero_ratio"] == pytest.approx(1 - sum(ranks.values()) / (13 * 8))
        assert row["nonzero_adapter_params"] == sum(ranks[n] * widths[n] for n in ranks)
        assert row["adapter_params"] == sum(8 * w for w in widths.values())
        assert 0 <= row["stage_time_s"] <= row["wall_time_s"]
    assert rows[0]["gate_zero_ratio"] == 0.0 < rows[1]["gate_zero_ratio"] <= rows[2]["gate_zero_ratio"]
    metrics = read_json(staged_run / "metrics.json")
    assert metrics["nonzero_adapter_params"] == rows[-1]["nonzero_adapter_params"]
    assert metrics["adapter_params"] == rows[-1]["adapter_params"]


def test_curve_png_and_stage_checkpoints(staged_run):
    import matplotlib.image

    image = matplotlib.image.imread(staged_run / "stages.png")
    assert image.shape[0] > 100 and image.shape[1] > 2 * image.shape[0]  # two panels side by side
    names = sorted(p.name for p in (staged_run / "checkpoints").iterdir())
    assert names == ["stage-0-xi0", "stage-1-xi0.5", "stage-2-xi1", "step-00000009", "step-00000012"]
    for i, name in enumerate(names[:3]):
        state = read_json(staged_run / "checkpoints" / name / "trainer_state.json")["state"]
        assert (state["stage_index"], state["stage_step"], state["global_step"]) == (i, STEPS, STEPS * (i + 1))


# --------------------------------------------------------------------------------------------- exports
def _rebuild(run_dir: Path, with_adapter: bool = True):
    """The run's model rebuilt as run.py builds it (same seed, so the same random base weights) and an
    evaluation batch; with the adapter of its final (unpruned) checkpoint, or the plain base model."""
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from adapters import load_adapter_state_dict
    from trainers.data.readers import build_classification_data, make_collator
    from trainers.models.loading import build_model, load_classifier, load_tokenizer

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    set_seed(int(cfg.seed))
    tokenizer = load_tokenizer(cfg.model)
    data = build_classification_data(cfg.dataset, str(REPO.parent / "shared" / "data"), tokenizer)
    batch = make_collator(tokenizer)([data.eval[i] for i in range(len(data.eval))])
    batch.pop("labels")
    if not with_adapter:
        return load_classifier(cfg.model, data.num_labels).eval(), batch
    from trainers.methods import get_method

    model, _ = build_model(cfg.model, get_method(cfg.adapter.name).adapter_spec(cfg.adapter), data.num_labels)
    load_adapter_state_dict(model, load_file(run_dir / "checkpoints" / "step-00000012" / "adapter.safetensors"))
    return model.eval(), batch


@torch.no_grad()
def test_prune_peft_and_merged_exports_match_the_trained_model(staged_run):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from adapters import effective_ranks, prune_sora_model, summarize_gate_sparsity

    model, batch = _rebuild(staged_run)
    assert summarize_gate_sparsity(model) > 0
    ranks = effective_ranks(model)
    want = model(**batch).logits
    assert prune_sora_model(model) == ranks  # pruned to the effective ranks ...
    torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=1e-5)  # ... with the same outputs

    export = read_json(staged_run / EXPORT_JSON)
    assert export["ranks_after"] == ranks and set(export["ranks_before"].values()) == {8}
    assert export["pruned_max_abs_logit_diff"] < 1e-4 and export["merged_max_abs_logit_diff"] < 1e-4
    config = read_json(staged_run / "adapter" / "adapter_config.json")
    kept = {n: r for n, r in ranks.items() if r > 0}
    assert sorted(config["target_modules"]) == sorted(kept)
    assert {n.replace("\\", ""): r for n, r in config["rank_pattern"].items()} == \
        {n: r for n, r in kept.items() if r != config["r"]}

    merged = AutoModelForSequenceClassification.from_pretrained(staged_run / "merged").eval()
    assert not any("lora" in k or "gate" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(**batch).logits, want, rtol=0, atol=1e-5)
    base, _ = _rebuild(staged_run, with_adapter=False)
    peft_model = PeftModel.from_pretrained(base, staged_run / "adapter").eval()
    torch.testing.assert_close(peft_model(**batch).logits, want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- resume
def test_kill_inside_a_stage_then_resume_equals_uninterrupted(staged_run, tmp_path):
    # step 7 is stage 1's third step; the newest checkpoint is step-6 (stage 1, stage_step 2)
    killed = run_main(ARGS + [KILL, "+trainer.callbacks.kill.step=7", f"hydra.run.dir={tmp_path}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = read_json(tmp_path / "checkpoints" / "step-00000006" / "trainer_state.json")["state"]
    assert (state["stage_index"], state["stage_step"]) == (1, 2)
    assert [r["stage"] for r in read_stages_csv(tmp_path / "stages.csv")] == [0]

    resumed = run_main(ARGS + ["resume=auto", f"hydra.run.dir={tmp_path}"])
    assert resumed.returncode == 0, resumed.stderr
    assert without_timings(read_json(tmp_path / "metrics.json")) == without_timings(read_json(staged_run /
                                                                                              "metrics.json"))
    assert (tmp_path / "metrics.jsonl").read_text() == (staged_run / "metrics.jsonl").read_text()

    def untimed(path: Path):
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in read_stages_csv(path)]

    assert untimed(tmp_path / "stages.csv") == untimed(staged_run / "stages.csv")
    for name in ("adapter/adapter_model.safetensors", "checkpoints/stage-2-xi1/adapter.safetensors"):
        assert (tmp_path / name).read_bytes() == (staged_run / name).read_bytes()
    assert read_json(tmp_path / EXPORT_JSON) == read_json(staged_run / EXPORT_JSON)
