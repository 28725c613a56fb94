"""curves.png: read from metrics.jsonl (sorted, deduplicated steps), one panel per logged quantity, readable
labels; drawn at the end of every run and, over each other, at the end of a sweep."""

from __future__ import annotations

import json
import subprocess
import sys

from _trainer_helpers import REPO, TINY, cli_env, run_main
from matplotlib.image import imread

from trainers.reports.curves import fmt_value, job_label, plot_run_curves, read_series, run_panels


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 100


def test_series_are_sorted_deduplicated_and_panels_follow_what_was_logged(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [
        {"step": 4, "split": "train", "loss": 0.5, "lr": 1e-3, "gate_lr": 2e-3, "grad_norm": 3.0,
         "grad_norm_gate": 0.5, "stage": "0", "accuracy": 0.7},
        {"step": 2, "split": "train", "loss": 0.9, "lr": 5e-4, "gate_lr": 1e-3, "grad_norm": 4.0,
         "grad_norm_gate": 0.25, "stage": "0", "accuracy": 0.6},
        {"step": 4, "split": "train", "loss": 0.4, "lr": 1e-3, "gate_lr": 2e-3, "grad_norm": 2.0,
         "grad_norm_gate": 0.5, "stage": "0", "accuracy": 0.7},  # a resumed run logged step 4 again
        {"step": 4, "split": "eval", "eval_accuracy": 0.75, "eval_loss": 0.6, "gate_zero_ratio": 0.1},
        {"step": 0, "split": "eval", "eval_accuracy": 0.5, "eval_loss": 0.7, "gate_zero_ratio": 0.0},
        {"step": 6, "split": "eval", "eval_accuracy": None},
    ])
    series = read_series(tmp_path)
    assert series["train"]["loss"] == [(2, 0.9), (4, 0.4)]
    assert series["eval"]["eval_accuracy"] == [(0, 0.5), (4, 0.75)]
    assert "stage" not in series["train"]
    panels = {panel[0]: [label for label, _ in lines] for panel, lines in run_panels(series)}
    assert panels == {"training loss": ["loss"], "evaluation": ["eval_accuracy"],
                      "learning rates": ["lr", "gate_lr"], "gate zero ratio": ["eval gate_zero_ratio"],
                      "gradient norms (before clipping)": ["grad_norm", "grad_norm_gate"]}
    assert_png(plot_run_curves(tmp_path))


def test_without_lines_nothing_is_drawn(tmp_path):
    assert plot_run_curves(tmp_path) is None
    assert not (tmp_path / "curves.png").exists()


def test_labels_are_readable():
    assert fmt_value("0.30000000000000004") == "0.3"
    assert fmt_value(1e-3 * 3) == "0.003" and fmt_value("1e-3") == "1e-3" and fmt_value("lora") == "lora"
    row = {"job": "1", "adapter": "dora", "trainer.base_lr": "0.00030000000000000003", "seed": "1"}
    assert job_label(row, ["adapter", "trainer.base_lr"]) == "adapter=dora base_lr=0.0003"
    assert job_label(row, []) == "1"


def test_a_run_and_a_sweep_draw_curves_and_the_weight_decomposition(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_main(["-m", *TINY, "adapter=lora,sora", "trainer.log_grad_norms=true", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr
    for job in ("0", "1"):
        assert_png(sweep / job / "curves.png")
        assert_png(sweep / job / "analysis" / "weight_decomposition.png")
    assert_png(sweep / "curves.png")
    assert_png(sweep / "weight_decomposition.png")
    assert f"Training curves of every job: {sweep / 'curves.png'}" in proc.stdout
    assert "Weight decomposition (corr of dM and dD: lora " in proc.stdout and ", sora " in proc.stdout

    # the analysis command on the finished sweep: one line per job and the correlation per method
    done = subprocess.run([sys.executable, "-m", "trainers.analysis", str(sweep)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(sweep / "0"), str(sweep / "1"), str(sweep)]
    assert "corr(dM, dD) per method: lora " in lines[-1]
