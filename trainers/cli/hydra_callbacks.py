"""Hydra callbacks (configured under ``hydra.callbacks`` in conf/config.yaml)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from trainers.core.errors import RunRefused, UserError
from trainers.loop.metrics_log import has_results
from trainers.reports.sweep import collect_sweep, format_table, task_table, write_summary

log = logging.getLogger(__name__)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


class RunDirGuard(Callback):
    """Refuse to start in a folder that holds an earlier run's results before Hydra writes anything there.

    A single run checks its run directory (and, with resume, that the checkpoint fits the config); a
    sweep without ``resume`` refuses a sweep directory whose jobs already hold results.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from trainers.experiments.session import resume_source

        try:
            resume_source(config, Path(config.hydra.run.dir))
        except UserError as exc:
            raise RunRefused(str(exc)) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        used = [p for p in sweep_dir.iterdir() if p.is_dir() and has_results(p)]
        if used and config.get("resume") is None:
            raise RunRefused(f"sweep directory {sweep_dir} already holds results (e.g. {used[0].name}/); pass "
                             f"resume=auto to continue that sweep or choose another hydra.sweep.dir")
        for job_dir in used:  # Hydra rewrites .hydra/ before a job can check its checkpoint: keep the old files
            backup_hydra_files(job_dir)


HYDRA_BACKUP = ".hydra.before-resume"


def backup_hydra_files(job_dir: Path) -> None:
    """Copy ``job_dir/.hydra`` (the config an earlier run used) aside before a resumed sweep rewrites it."""
    source = Path(job_dir) / ".hydra"
    if source.is_dir():
        shutil.copytree(source, Path(job_dir) / HYDRA_BACKUP, dirs_exist_ok=True)


def settle_hydra_files(run_dir: Path, keep_new: bool) -> None:
    """After a resumed sweep job: drop the backup (``keep_new``: the job took the folder over) or put the
    earlier run's ``.hydra`` files back (the job was refused, e.g. its config does not fit the checkpoint)."""
    backup = Path(run_dir) / HYDRA_BACKUP
    if not backup.is_dir():
        return
    if not keep_new:
        shutil.rmtree(Path(run_dir) / ".hydra", ignore_errors=True)
        backup.rename(Path(run_dir) / ".hydra")
    else:
        shutil.rmtree(backup, ignore_errors=True)


def sweep_progress(sweep_dir: Path, job: str, total: int | None = None) -> str:
    """``sweep <dir>: job 2 completed (eval_accuracy 0.8876); 3 jobs done (2 completed, 1 failed)[ of N]``, from the
    job folders' ``metrics.json``."""
    statuses: dict[str, str] = {}
    this: dict[str, Any] = {}
    for folder in Path(sweep_dir).iterdir():
        metrics_file = folder / "metrics.json"
        if not folder.is_dir() or not metrics_file.is_file():
            continue
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metrics = {"status": "failed"}
        statuses[folder.name] = str(metrics.get("status", "failed"))
        if folder.name == job:
            this = metrics
    status = this.get("status", "failed")
    score = this.get("eval_accuracy")
    shown = f" (eval_accuracy {score:.4f})" if isinstance(score, float) else ""
    completed = sum(s == "completed" for s in statuses.values())
    of = f" of {total}" if total else ""
    return (f"sweep {sweep_dir}: job {job} {status}{shown}; {len(statuses)}{of} jobs done "
            f"({completed} completed, {len(statuses) - completed} not)")


class SweepSummary(Callback):
    """When a sweep ends: ``summary.csv`` in the sweep folder (one row per job), a printed table and
    ``curves.png`` (every job's training curves over each other), ``weight_decomposition.png`` (the jobs'
    dM-dD scatter, one panel per method); with SoRA jobs also ``sweep_curve.png``
    (accuracy against gate zero ratio and kept adapter parameters)."""

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        """A sweep's progress line after each job: its outcome and the sweep's count so far."""
        from hydra.types import RunMode

        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN or not _is_main_process():
            return
        log.info("%s", sweep_progress(Path(config.hydra.sweep.dir), str(config.hydra.job.num),
                                      OmegaConf.select(config, "hydra.sweeper.n_trials", default=None)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not _is_main_process():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_sweep(sweep_dir)
        if not rows:
            log.warning("no job folders found under %s: no summary written", sweep_dir)
            return
        path = write_summary(sweep_dir, rows)
        failed = sum(r["status"] != "completed" for r in rows)
        print(f"\nSweep summary ({len(rows)} jobs, {failed} failed): {path}\n{format_table(rows)}", flush=True)
        table = task_table(rows)
        if table is not None:  # GLUE-style sweeps: eval_score x 100 per method and task
            print(f"\neval_score x 100 by method and task (mean ±std over seeds):\n{table}", flush=True)
        from trainers.methods.sora_report import plot_sweep
        from trainers.reports.curves import plot_sweep_curves

        try:
            curves = plot_sweep_curves(sweep_dir, rows)
        except Exception as exc:  # the summary is written; a picture must not fail the sweep
            log.warning("sweep curves.png not drawn: %s", exc)
        else:
            if curves is not None:
                print(f"Training curves of every job: {curves}", flush=True)
        from trainers.reports.weight_decomposition import plot_sweep_decomposition

        try:
            scatter, corr = plot_sweep_decomposition(sweep_dir, [sweep_dir / r["job"] for r in rows])
        except Exception as exc:
            log.warning("sweep weight_decomposition.png not drawn: %s", exc)
        else:
            if scatter is not None:
                shown = ", ".join(f"{m} {c:+.3f}" for m, c in corr.items())
                print(f"Weight decomposition (corr of dM and dD: {shown}): {scatter}", flush=True)

        plot = plot_sweep(sweep_dir, rows)  # SoRA jobs: accuracy vs sparsity across the sweep
        if plot is not None:
            print(f"Accuracy vs sparsity plot: {plot}", flush=True)
