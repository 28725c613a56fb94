"""DDP on 2 CPU processes (gloo) through accelerate: one run folder, files written once, all data seen."""

from __future__ import annotations

import subprocess
import sys

from _trainer_helpers import MAIN, TINY, cli_env, read_json


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
