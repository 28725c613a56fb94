"""The Hydra job: check the config, train into Hydra's output folder, record a failure where that is safe."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainers.cli.hydra_callbacks import is_main_process
from trainers.cli.schemas import validate_config
from trainers.core.config import without_hydra
from trainers.core.errors import RunInterrupted
from trainers.core.lock import claim_dir, lock_dir, unlock_dir
from trainers.core.signals import preemption_handler
from trainers.loop.metrics_log import write_metrics_json

log = logging.getLogger(__name__)


class TrialFailed(Exception):
    """Raised by a failed job under a sweeper that records failed trials (optuna marks the trial failed)."""


def reports_failed_trials(hydra_cfg: Any) -> bool:
    """True for sweepers that catch a job's exception and record a failed trial (hydra-optuna-sweeper); the
    basic sweeper would stop the sweep instead, so its failed jobs return NaN."""
    target = str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="") or "")
    return "optuna" in target.lower()


def record_failure(run_dir: Path, error: BaseException, status: dict[str, Any]) -> None:
    """Write ``metrics.json`` with status failed, unless that could overwrite an earlier run's results."""
    if not status.get("may_write"):
        return
    try:
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return
    except Exception:
        pass
    details = getattr(error, "details", {})  # e.g. the step and reason of a non-finite stop
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_metrics_json(run_dir, {"status": "failed", "error": " ".join(str(error).split())[:500], **details})
    except OSError as exc:  # e.g. the disk is full: the original error is what the user must see
        log.debug("could not write metrics.json: %s", exc)


def record_interrupt(run_dir: Path, exc: BaseException, status: dict[str, Any]) -> None:
    """Write ``metrics.json`` with status interrupted (signal, step and checkpoint where known), where that is safe."""
    if not status.get("may_write") or not is_main_process():
        return
    record: dict[str, Any] = {"status": "interrupted", "signal": "SIGINT"}
    if isinstance(exc, RunInterrupted):
        record["signal"] = exc.signal
        if exc.step is not None:
            record.update(step=exc.step, checkpoint=exc.checkpoint)
    try:
        write_metrics_json(run_dir, record)
    except OSError as error:
        log.debug("could not write metrics.json: %s", error)


def resume_hint(run_dir: Path, hydra_cfg: Any) -> str:
    """Where the run is and the command that continues it."""
    from hydra.types import RunMode

    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hydra_cfg.sweep.dir)
        return (f"the job folder is {run_dir}; continue the sweep by relaunching it with resume=auto "
                f"hydra.sweep.dir={shlex.quote(str(sweep_dir))}")
    keep = [o for o in hydra_cfg.overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    command = ["python", "main.py", *keep, "resume=auto", f"hydra.run.dir={run_dir}"]
    return f"the run folder is {run_dir}; continue with: {' '.join(shlex.quote(c) for c in command)}"


def run_job(cfg: DictConfig) -> float:
    """The Hydra task: train into Hydra's output folder; return eval_score (the task's main metric; runs without
    one: eval_accuracy) for sweepers.

    In a multirun a failing job writes status failed and returns NaN so the sweep goes on (under the optuna
    sweeper it raises :class:`TrialFailed`, which optuna records as a failed trial); a single run re-raises
    (the CLI prints one line and exits non-zero).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from trainers.loop.metrics_log import has_results

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    status: dict[str, Any] = {"may_write": False}
    refusal = "interrupted before it started"
    log.info("run folder: %s", run_dir)
    try:
        if is_main_process():  # held since RunDirGuard.on_run_start in a single run; a sweep job locks here
            lock_dir(run_dir, "choose another hydra.run.dir / hydra.sweep.dir")
            claim_dir(run_dir)
        status["may_write"] = not has_results(run_dir)
        cfg = without_hydra(cfg)
        validate_config(cfg)  # before the heavy imports of a run, so config errors come back fast
        from trainers.experiments.single import train_run

        with preemption_handler():  # SIGTERM: checkpoint at the next step boundary, then RunInterrupted
            final = train_run(cfg, run_dir, status)
        result = float(final.get("eval_score", final.get("eval_accuracy", float("nan"))))
        log.info("results in %s", run_dir)
    except (KeyboardInterrupt, RunInterrupted) as exc:
        record_interrupt(run_dir, exc, status)
        from trainers.cli.app import note_interrupted

        note_interrupted(resume_hint(run_dir, hydra_cfg))
        raise
    except Exception as exc:
        record_failure(run_dir, exc, status)
        from trainers.cli.app import format_error, report_failure

        refusal = format_error(exc)

        if hydra_cfg.mode == RunMode.MULTIRUN:
            message = format_error(exc)
            log.error("job %s failed: %s", hydra_cfg.job.num, message)
            if reports_failed_trials(hydra_cfg):  # optuna: a failed trial, not a NaN score
                raise TrialFailed(f"job {hydra_cfg.job.num} failed: {message}") from None
            return float("nan")
        if report_failure(exc):  # the CLI prints it as one line and exits 1
            log.debug("run failed", exc_info=exc)
            return float("nan")
        raise
    finally:
        from trainers.cli.hydra_callbacks import forget_run_files, restore_run_files, settle_hydra_files

        owned = bool(status.get("may_write"))  # False: refused; everything in the folder goes back as it was
        if hydra_cfg.mode == RunMode.MULTIRUN:  # a resumed sweep job: keep or restore the earlier .hydra/ files
            from trainers.cli.app import note_sweep_job

            settle_hydra_files(run_dir, keep_new=owned)
            note_sweep_job(str(run_dir), None if owned else refusal)
        elif owned:
            forget_run_files(run_dir)
        else:
            restore_run_files(run_dir)
        unlock_dir(run_dir, refused=not owned)
    return result
