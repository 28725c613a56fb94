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
from trainers.core.lock import claim_dir, lock_dir, unlock_dir
from trainers.loop.metrics_log import has_results
from trainers.reports.sweep import (
    SUMMARY_METRICS,
    collect_sweep,
    format_table,
    seed_table,
    task_table,
    write_summary,
)

log = logging.getLogger(__name__)


def is_main_process() -> bool:
    """Process 0 of a DDP launch (the one that writes files); True without DDP."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


class RunDirGuard(Callback):
    """Refuse to start in a folder that holds an earlier run's results before Hydra writes anything there.

    A single run first takes the folder's exclusive lock (``trainers.core.lock``), then checks its run
    directory (and, with resume, that the checkpoint fits the config) and remembers the files Hydra is about
    to rewrite, so that a resume refused later leaves them as they were. A sweep locks its sweep directory
    and, without ``resume``, refuses one whose jobs already hold results.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from trainers.experiments.session import resume_source

        run_dir = Path(config.hydra.run.dir)
        main = is_main_process()
        try:
            if main:  # one writer per run folder, from before Hydra writes into it until the process ends
                lock_dir(run_dir, "choose another hydra.run.dir")
            resume_source(config, run_dir)
        except UserError as exc:
            unlock_dir(run_dir, refused=True)
            raise RunRefused(str(exc)) from None
        if main:
            if has_results(run_dir):  # a resume: Hydra rewrites .hydra/ and appends to main.log before the
                remember_run_files(run_dir)  # job can load the checkpoint; a refused resume puts them back
            claim_dir(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not is_main_process():
            return
        try:  # one sweep per sweep folder (each job also locks its own folder)
            lock_dir(sweep_dir, "choose another hydra.sweep.dir")
        except UserError as exc:
            raise RunRefused(str(exc)) from None
        used = [p for p in sweep_dir.iterdir() if p.is_dir() and has_results(p)]
        if used and config.get("resume") is None:
            unlock_dir(sweep_dir, refused=True)
            raise RunRefused(f"sweep directory {sweep_dir} already holds results (e.g. {used[0].name}/); pass "
                             f"resume=auto to continue that sweep or choose another hydra.sweep.dir")
        claim_dir(sweep_dir)
        multirun_yaml = sweep_dir / MULTIRUN_YAML  # Hydra rewrites it next: back if every job is refused
        _REMEMBERED_SWEEP[str(sweep_dir.resolve())] = multirun_yaml.read_bytes() if multirun_yaml.is_file() else None
        for job_dir in used:  # Hydra rewrites .hydra/ before a job can check its checkpoint: keep the old files
            backup_hydra_files(job_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # after the summary (Hydra calls end hooks in reverse order)
        sweep_dir = Path(config.hydra.sweep.dir)
        previous = _REMEMBERED_SWEEP.pop(str(sweep_dir.resolve()), False)
        for job_dir, size in _PENDING_LOGS.items():  # later jobs' launch lines went into a refused job's main.log
            _restore_log(Path(job_dir) / LOG_FILE, size)
        _PENDING_LOGS.clear()
        refused = all_refused()
        if previous is not False and refused:
            path = sweep_dir / MULTIRUN_YAML
            if previous is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(previous)
        unlock_dir(sweep_dir, refused=refused)


def all_refused() -> bool:
    """True if this process launched sweep jobs and every one of them was refused."""
    from trainers.cli.app import sweep_jobs

    jobs = sweep_jobs()
    return bool(jobs) and all(why is not None for why in jobs.values())


HYDRA_BACKUP = ".hydra.before-resume"
LOG_FILE = "main.log"
LOG_SIZE = "main.log.size"  # inside HYDRA_BACKUP: main.log's size before the resumed job
_REMEMBERED: dict[str, tuple[dict[str, bytes] | None, int | None]] = {}
MULTIRUN_YAML = "multirun.yaml"
_REMEMBERED_SWEEP: dict[str, bytes | None] = {}  # sweep folder -> multirun.yaml before this launch
_PENDING_LOGS: dict[str, int | None] = {}  # refused sweep job folder -> main.log size to restore at the sweep's end


def remember_run_files(run_dir: Path) -> None:
    """Keep (in memory) the ``.hydra/`` files and main.log's size of a run folder about to be resumed."""
    hydra = Path(run_dir) / ".hydra"
    files = {f.name: f.read_bytes() for f in hydra.iterdir() if f.is_file()} if hydra.is_dir() else None
    log_file = Path(run_dir) / LOG_FILE
    _REMEMBERED[str(Path(run_dir).resolve())] = (files, log_file.stat().st_size if log_file.is_file() else None)


def restore_run_files(run_dir: Path) -> None:
    """After a refused resume: ``.hydra/`` and main.log exactly as :func:`remember_run_files` found them."""
    saved = _REMEMBERED.pop(str(Path(run_dir).resolve()), None)
    if saved is None:
        return
    files, log_size = saved
    hydra = Path(run_dir) / ".hydra"
    if files is None:
        shutil.rmtree(hydra, ignore_errors=True)
    else:
        hydra.mkdir(exist_ok=True)
        for extra in hydra.iterdir():
            if extra.name not in files:
                extra.unlink()
        for name, data in files.items():
            (hydra / name).write_bytes(data)
    _restore_log(Path(run_dir) / LOG_FILE, log_size)


def _restore_log(log_file: Path, size: int | None) -> None:
    try:
        if size is None:
            log_file.unlink(missing_ok=True)
        elif log_file.is_file():
            os.truncate(log_file, size)
    except OSError as exc:
        log.debug("could not restore %s: %s", log_file, exc)


def forget_run_files(run_dir: Path) -> None:
    """The resume went ahead: drop what :func:`remember_run_files` kept."""
    _REMEMBERED.pop(str(Path(run_dir).resolve()), None)


def backup_hydra_files(job_dir: Path) -> None:
    """Copy ``job_dir/.hydra`` (the config an earlier run used) aside before a resumed sweep rewrites it."""
    source = Path(job_dir) / ".hydra"
    if source.is_dir():
        backup = Path(job_dir) / HYDRA_BACKUP
        shutil.copytree(source, backup, dirs_exist_ok=True)
        log_file = Path(job_dir) / LOG_FILE
        (backup / LOG_SIZE).write_text(str(log_file.stat().st_size) if log_file.is_file() else "none")


def settle_hydra_files(run_dir: Path, keep_new: bool) -> None:
    """After a resumed sweep job: drop the backup (``keep_new``: the job took the folder over) or put the
    earlier run's ``.hydra`` files back (the job was refused, e.g. its config does not fit the checkpoint)."""
    backup = Path(run_dir) / HYDRA_BACKUP
    if not backup.is_dir():
        return
    if not keep_new:
        size_file = backup / LOG_SIZE
        if size_file.is_file():
            size = size_file.read_text().strip()
            size_file.unlink()
            _PENDING_LOGS[str(run_dir)] = int(size) if size.isdigit() else None
            _restore_log(Path(run_dir) / LOG_FILE, _PENDING_LOGS[str(run_dir)])
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

        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN or not is_main_process():
            return
        log.info("%s", sweep_progress(Path(config.hydra.sweep.dir), str(config.hydra.job.num),
                                      OmegaConf.select(config, "hydra.sweeper.n_trials", default=None)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main_process():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_sweep(sweep_dir)
        if not rows:
            log.warning("no job folders found under %s: no summary written", sweep_dir)
            return
        from trainers.cli.app import sweep_jobs

        refused = {str(Path(job).resolve()): why for job, why in sweep_jobs().items() if why is not None}
        for row in rows:  # a refused job's folder still holds its earlier results: this launch did not produce them
            why = refused.get(str((sweep_dir / row["job"]).resolve()))
            if why is not None:
                row.update({k: None for k in SUMMARY_METRICS}, status="refused", error=why)
        failed = sum(r["status"] not in ("completed", "refused") for r in rows)
        counts = f"{len(rows)} jobs, {failed} failed" + (f", {len(refused)} refused" if refused else "")
        if all_refused():  # nothing of this launch ran: the sweep folder stays as it was
            where = "nothing written"
        else:
            where = str(write_summary(sweep_dir, rows))
        print(f"\nSweep summary ({counts}): {where}\n{format_table(rows)}", flush=True)
        if all_refused():
            return
        table = task_table(rows)
        if table is not None:  # GLUE-style sweeps: eval_score x 100 per method and task
            print(f"\neval_score x 100 by method and task (mean ±std over seeds):\n{table}", flush=True)
        table = seed_table(rows)
        if table is not None:  # any sweep over seeds: mean ±std per setting
            print(f"\nmean ±std over seeds:\n{table}", flush=True)
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
