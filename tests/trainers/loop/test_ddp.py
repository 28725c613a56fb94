"""DDP on 2 CPU processes (gloo) through accelerate: one run folder, files written once, all data seen."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _trainer_helpers import MAIN, TINY, cli_env, read_json
from scipy.stats import spearmanr


def launch(args: list[str], cwd, *launch_args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "--main_process_port", "29533", str(MAIN), *args]
    return subprocess.run(cmd, cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=300)


def test_two_cpu_processes(tmp_path):
    # `accelerate launch --cpu` starts one process unless MPI is set up; --multi_gpu with
    # ACCELERATE_USE_CPU=1 starts two processes on the CPU with torch.distributed (gloo).
    proc = launch(TINY + ["adapter=sora", "trainer.save_every_steps=2"], tmp_path, "--multi_gpu", "--num_processes",
                  "2", ACCELERATE_USE_CPU="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list(tmp_path.glob("outputs/*/*"))
    assert len(runs) == 1, runs  # both processes agreed on one folder
    run = runs[0]
    metrics = read_json(run / "metrics.json")
    # 48 examples, 2 processes x batch 8: 3 steps, every example seen once
    assert metrics["status"] == "completed" and metrics["global_step"] == 3 and metrics["train_samples"] == 48
    assert "2 process(es)" in (run / "main.log").read_text()
    newest = sorted((run / "checkpoints").iterdir())[-1]
    assert {p.name for p in newest.iterdir()} == {"adapter.safetensors", "training_state.pt", "trainer_state.json",
                                                  "rng_state_0.pt", "rng_state_1.pt"}
    assert read_json(newest / "trainer_state.json")["world_size"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 3  # train at steps 2 and 3, eval at 3: each written once
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]

    # the same checkpoint cannot silently continue with another number of processes
    single = subprocess.run([sys.executable, str(MAIN), *TINY, "adapter=sora", "trainer.save_every_steps=2",
                             "resume=auto", f"hydra.run.dir={run}"], cwd=tmp_path, env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode != 0 and "was written by 2 process(es), this run has 1" in single.stderr


def test_accelerate_launch_cpu_runs(tmp_path):
    proc = launch(TINY + [f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, "--cpu", "--num_processes", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(tmp_path / "run" / "metrics.json")["status"] == "completed"


def test_glue_metrics_gather_every_process(tmp_path):
    """STS-B on 2 processes, 23 dev pairs (12 + 11 per process): eval_pearson / eval_spearmanr / eval_loss are
    those of all 23 predictions (recomputed one example at a time after training)."""
    run = tmp_path / "run"
    proc = launch(TINY + ["dataset=stsb", "dataset.max_eval_samples=23", "trainer.eval_batch_size=4",
                          "+trainer.callbacks.keep={_target_:tests._glue_helpers.KeepEvalOutputs,save:true}",
                          f"hydra.run.dir={run}"], tmp_path, "--multi_gpu", "--num_processes", "2",
                  ACCELERATE_USE_CPU="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_json(run / "metrics.json")
    outputs = read_json(run / "eval_outputs.json")
    preds = np.array([row[0] for row in outputs["logits"]])
    labels = np.array(outputs["labels"])
    assert len(labels) == 23
    assert metrics["eval_pearson"] == pytest.approx(float(np.corrcoef(preds, labels)[0, 1]), abs=1e-5)
    assert metrics["eval_spearmanr"] == pytest.approx(float(spearmanr(preds, labels)[0]), abs=1e-5)
    assert metrics["eval_loss"] == pytest.approx(float(np.mean((preds - labels) ** 2)), rel=1e-5)
