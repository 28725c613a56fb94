"""Multiruns: one folder per job, summary.csv + a printed table at the end, failed jobs as rows."""

from __future__ import annotations

import csv
import subprocess
import sys

from _trainer_helpers import MAIN, TINY, cli_env, read_json, run_main

from trainers.reports.sweep import collect_sweep


def test_sweep_writes_one_summary_with_failed_rows(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_main(["-m", *TINY, "adapter=sora", "sparse_lambda=0.0,0.4", "adapter.r=4,0", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr
    with (sweep / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [(r["sparse_lambda"], r["adapter.r"], r["status"]) for r in rows] == [
        ("0.0", "4", "completed"), ("0.0", "0", "failed"), ("0.4", "4", "completed"), ("0.4", "0", "failed")]
    for row in rows:
        assert "adapter=sora" in row["overrides"] and f"sparse_lambda={row['sparse_lambda']}" in row["overrides"]
        metrics = read_json(sweep / row["job"] / "metrics.json")
        if row["status"] == "completed":
            assert float(row["eval_accuracy"]) == metrics["eval_accuracy"]
            assert float(row["gate_zero_ratio"]) == metrics["gate_zero_ratio"]
            assert int(row["trainable_params"]) == metrics["trainable_params"]
            assert (sweep / row["job"] / "adapter" / "adapter_config.json").is_file()
        else:
            assert row["error"] == "adapter.r must be > 0 (got 0)" and row["eval_accuracy"] == ""
    assert "Sweep summary (4 jobs, 2 failed)" in proc.stdout
    output = proc.stdout + proc.stderr  # a progress line after each job
    assert f"sweep {sweep}: job 0 completed (eval_accuracy " in output
    assert f"sweep {sweep}: job 1 failed; 2 jobs done (1 completed, 1 not)" in output
    assert f"sweep {sweep}: job 3 failed; 4 jobs done (2 completed, 2 not)" in output
    table = proc.stdout.split("Sweep summary", 1)[1].splitlines()
    assert table[1].split()[:3] == ["job", "sparse_lambda", "adapter.r"]  # only the swept keys
    assert table[3].split()[0] == "0" and table[3].split()[-1] == "completed"
    assert table[4].split()[-1] == "failed"

    (sweep / "2" / "metrics.json").unlink()  # as if job 2 had been killed (e.g. by SLURM) before finishing
    assert collect_sweep(sweep)[2]["status"] == "failed"
    assert "no metrics.json" in collect_sweep(sweep)[2]["error"]


def test_sweep_dir_with_results_is_refused_without_resume(tmp_path):
    sweep = tmp_path / "sweep"
    assert run_main(["-m", *TINY, "seed=1", f"hydra.sweep.dir={sweep}"]).returncode == 0
    before = (sweep / "0" / "metrics.json").read_text()
    proc = run_main(["-m", *TINY, "seed=1", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode != 0 and "already holds results" in proc.stderr
    assert (sweep / "0" / "metrics.json").read_text() == before


def test_two_sweeps_started_together_get_two_folders(tmp_path):
    args = [sys.executable, str(MAIN), "-m", *TINY, "adapter.r=0,-1"]  # jobs fail fast; the folders are the point
    procs = [subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    for proc in procs:
        proc.communicate(timeout=300)
        assert proc.returncode == 0
    sweeps = sorted(p.parent for p in tmp_path.glob("multirun/*/*/summary.csv"))
    assert len(sweeps) == 2 and sweeps[0] != sweeps[1]


def test_resumed_sweep_with_a_changed_config_keeps_the_earlier_hydra_files(tmp_path):
    from _trainer_helpers import snapshot

    sweep = tmp_path / "sweep"
    assert run_main(["-m", *TINY, "seed=1,2", f"hydra.sweep.dir={sweep}"]).returncode == 0
    before = snapshot(sweep)
    # base_lr differs from the checkpoints' config: every job is refused, the sweep fails, and nothing in the
    # sweep folder changes (the jobs' .hydra/ and main.log, multirun.yaml, summary.csv)
    proc = run_main(["-m", *TINY, "seed=1,2", "trainer.base_lr=0.5", "resume=auto", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 1 and "job 0 failed: checkpoint" in proc.stdout and "trainer.base_lr" in proc.stdout
    assert "Sweep summary (2 jobs, 0 failed, 2 refused): nothing written" in proc.stdout
    table = proc.stdout.split("Sweep summary", 1)[1].splitlines()
    assert table[3].split()[-1] == "refused" and table[4].split()[-1] == "refused"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in proc.stderr.splitlines() if line.strip()] and len(errors) == 1
    assert errors[0].startswith(f"error: 2 of 2 sweep jobs were refused and left as they were (first: {sweep / '0'}: "
                                f"checkpoint ")
    assert snapshot(sweep) == before
    # the same config resumes (nothing left to train) and keeps Hydra's new files, without a backup left over
    proc = run_main(["-m", *TINY, "seed=1,2", "resume=auto", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr
    assert "resume: auto" in (sweep / "0" / ".hydra" / "config.yaml").read_text()
    assert not (sweep / "0" / ".hydra.before-resume").exists()
