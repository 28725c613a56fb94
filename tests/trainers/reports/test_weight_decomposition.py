"""The weight-decomposition analysis: dM / dD against a hand computation, per layer kind against the explicit
merged weight, full fine-tuning of the targets (adapter=full), the CSV and scatter of a run, and
``python -m trainers.analysis`` on finished run folders."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _config import compose_config
from _tiny_models import randomize_adapters, tiny_bert, token_batch
from _trainer_helpers import REPO, cli_env
from matplotlib.image import imread
from omegaconf import OmegaConf

from adapters import FullLinear, decomposition_change, merge_model, weight_decomposition, wrap_linears
from trainers.analysis import main as analysis_main
from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError
from trainers.experiments.single import train_run
from trainers.reports.weight_decomposition import pearson

CONF = REPO / "conf"
TINY = ["model=tiny-random-bert", "dataset.max_train_samples=40", "dataset.max_eval_samples=16",
        "trainer.batch_size=8", "trainer.eval_batch_size=16", "trainer.log_every_steps=2", "trainer.base_lr=1e-2"]


def make(overrides):
    return compose_config(TINY + list(overrides))


pytestmark = pytest.mark.usefixtures("one_thread")  # small runs on one thread (conftest.py)


def read_csv(run_dir: Path) -> list[dict]:
    with (run_dir / "analysis" / "weight_decomposition.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_dm_dd_of_a_2x3_weight_by_hand():
    w0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 4.0]])
    wt = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    # rows: m0 = (1, 5), mt = (sqrt 2, 5); cos = (1 / sqrt 2, 20 / 25)
    expected_dm = ((math.sqrt(2) - 1) + 0.0) / 2
    expected_dd = ((1 - 1 / math.sqrt(2)) + (1 - 0.8)) / 2
    dm, dd = decomposition_change(w0, wt)
    assert dm == pytest.approx(expected_dm, abs=1e-7) and dd == pytest.approx(expected_dd, abs=1e-7)
    assert decomposition_change(w0, w0) == (0.0, 0.0)
    assert decomposition_change(w0, 3 * w0) == pytest.approx((2 * 3.0, 0.0))  # scaling moves only m: mean(2, 10)
    zero_row = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 4.0]])  # no direction: cos counts as 0
    assert decomposition_change(zero_row, w0) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="one \\(out, in\\) shape"):
        decomposition_change(w0, wt.T)


@pytest.mark.parametrize("adapter", ["lora", "dora", "sora"])
def test_model_rows_use_the_merged_weight_against_the_pretrained_one(adapter):
    model = tiny_bert()
    pretrained = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    wrapped = wrap_linears(model, ["query", "value"], adapter=adapter, r=4, lora_alpha=8)
    randomize_adapters(model)
    rows = weight_decomposition(model)
    assert sorted(r["layer"] for r in rows) == sorted(wrapped)
    merge_model(model)  # the explicit merged weight, folded by the layer itself
    for row in rows:
        merged = model.get_submodule(row["layer"]).base_layer.weight
        dm, dd = decomposition_change(pretrained[row["layer"]], merged)
        assert row["dM"] == pytest.approx(dm, rel=1e-5, abs=1e-9) and row["dD"] == pytest.approx(dd, rel=1e-5, abs=1e-9)
        assert row["dM"] > 0 and row["dD"] > 0


def test_full_fine_tuning_trains_the_target_layers_in_place():
    model = tiny_bert()
    before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    batch = token_batch()
    reference = model(**batch).logits.detach()
    wrapped = wrap_linears(model, ["query"], adapter="full", modules_to_save=["classifier"])
    layer = model.get_submodule(wrapped[0])
    assert isinstance(layer, FullLinear)
    torch.testing.assert_close(model(**batch).logits, reference, rtol=0, atol=0)  # starts as the same model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.base_layer.{k}" for n in wrapped for k in ("weight", "bias")} | {
        "classifier.weight", "classifier.bias"}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch, labels=torch.tensor([0, 1, 2])).loss.backward()
    opt.step()
    torch.testing.assert_close(layer.initial_weight(), before, rtol=0, atol=0)
    torch.testing.assert_close(layer.delta_weight(), layer.base_layer.weight - before, rtol=0, atol=0)
    dm, dd = decomposition_change(before, layer.base_layer.weight)
    assert weight_decomposition(model)[0] == {"layer": wrapped[0], "dM": dm, "dD": dd} and dd > 0
    assert "weight_init" not in model.state_dict() and f"{wrapped[0]}.base_layer.weight" in model.state_dict()
    merge_model(model, unload=True)  # the trained weight stays: a plain model that computes the same
    assert type(model.get_submodule(wrapped[0])) is torch.nn.Linear


def test_a_run_writes_csv_and_scatter_and_the_cli_recomputes_them_from_checkpoints(tmp_path):
    live, cold = tmp_path / "live", tmp_path / "cold"
    result = train_run(make(["adapter=full", "analysis.every_steps=2"]), live)
    rows = read_csv(live)
    want_corr = pearson([float(r["dD"]) for r in rows], [float(r["dM"]) for r in rows])
    assert result["dm_dd_corr"] == pytest.approx(want_corr, rel=1e-6)  # into metrics.json (and summary.csv)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    assert len(layers) == 13  # every linear of the 2-layer encoder + the pooler
    assert [int(r["step"]) for r in rows] == [s for s in (2, 4, 5) for _ in layers]
    assert {r["method"] for r in rows} == {"full"}
    png = live / "analysis" / "weight_decomposition.png"
    assert png.stat().st_size > 1000 and imread(png).shape[0] > 100

    # the same run without the analysis, checkpoints at 4 and 5 kept: the command rebuilds the same numbers
    cfg = make(["adapter=full", "analysis.weight_decomposition=false", "trainer.save_every_steps=2",
                "trainer.keep_last_checkpoints=2"])
    train_run(cfg, cold)
    assert not (cold / "analysis").exists()
    (cold / ".hydra").mkdir()
    (cold / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))  # as Hydra writes it for main.py
    assert analysis_main([str(cold)]) == 0
    recomputed = read_csv(cold)
    assert [int(r["step"]) for r in recomputed] == [s for s in (4, 5) for _ in layers]
    live_rows = {(r["step"], r["layer"]): r for r in rows}
    for row in recomputed:
        want = live_rows[(row["step"], row["layer"])]
        assert float(row["dM"]) == pytest.approx(float(want["dM"]), rel=1e-6)
        assert float(row["dD"]) == pytest.approx(float(want["dD"]), rel=1e-6)
    assert (cold / "analysis" / "weight_decomposition.png").stat().st_size > 1000


def test_the_command_on_a_folder_without_runs_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainers.analysis", str(tmp_path)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path} holds no run folder (no .hydra/config.yaml)"]


def test_pearson_and_config_check():
    xs, ys = [0.1, 0.2, 0.4, 0.3], [1.0, 0.5, 0.2, 0.4]
    want = float(torch.corrcoef(torch.tensor([xs, ys], dtype=torch.float64))[0, 1])
    assert pearson(xs, ys) == pytest.approx(want, rel=1e-12) and want < 0
    assert math.isnan(pearson([1.0], [2.0])) and math.isnan(pearson([1.0, 1.0], [2.0, 3.0]))
    with pytest.raises(UserError, match="analysis.every_steps must be >= 0"):
        validate_config(make(["analysis.every_steps=-1"]))


def test_a_resumed_run_keeps_the_rows_before_its_checkpoint_and_drops_later_ones(tmp_path):
    from types import SimpleNamespace

    from trainers.reports.weight_decomposition import WeightDecompositionAnalysis, read_rows, write_rows

    write_rows(tmp_path, [{"method": "lora", "step": s, "layer": "q", "dM": 0.1 * s, "dD": 0.01 * s}
                          for s in (2, 4, 6)])
    model = tiny_bert()
    wrap_linears(model, ["query"], adapter="lora", r=2)
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=4), run_dir=tmp_path, model=model, is_main=True)
    callback = WeightDecompositionAnalysis("lora", every_steps=2)
    callback.on_train_begin(trainer)  # resumed at step 4: the step-6 row came from after the checkpoint
    assert [r["step"] for r in callback.rows] == [2, 4]
    trainer.state.global_step = 6
    callback.on_step_end(trainer)
    rows = read_rows(tmp_path)
    assert [(r["step"], r["layer"]) for r in rows] == [(2, "q"), (4, "q")] + [
        (6, f"bert.encoder.layer.{i}.attention.self.query") for i in (0, 1)]
    assert rows[-1]["dM"] == 0.0 and rows[-1]["dD"] == 0.0  # B = 0: the layer has not moved
