"""The Hydra job: check the config, train into Hydra's output folder, record a failure where that is safe."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainers.cli.schemas import validate_config
from trainers.core.config import without_hydra
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
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_metrics_json(run_dir, {"status": "failed", "error": " ".join(str(error).split())[:500]})


def record_interrupt(run_dir: Path, status: dict[str, Any]) -> None:
    """Write ``metrics.json`` with status interrupted (and how to continue), where a failure could be written."""
    if not status.get("may_write"):
        return
    try:
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return
    except Exception:
        pass
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_metrics_json(run_dir, {"status": "interrupted",
                                 "error": f"interrupted; continue from the last checkpoint with resume=auto "
                                          f"hydra.run.dir={run_dir} (sweeps: hydra.sweep.dir)"})


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
    status: dict[str, Any] = {"may_write": not has_results(run_dir)}
    log.info("run folder: %s", run_dir)
    try:
        cfg = without_hydra(cfg)
        validate_config(cfg)  # before the heavy imports of a run, so config errors come back fast
        from trainers.experiments.single import train_run

        final = train_run(cfg, run_dir, status)
        result = float(final.get("eval_score", final.get("eval_accuracy", float("nan"))))
        log.info("results in %s", run_dir)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (run_cli turns it into this)
        record_interrupt(run_dir, status)
        log.warning("interrupted: run folder %s; continue it with resume=auto hydra.run.dir=%s", run_dir, run_dir)
        raise
    except Exception as exc:
        record_failure(run_dir, exc, status)
        from trainers.cli.app import format_error, report_failure

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
        if hydra_cfg.mode == RunMode.MULTIRUN:  # a resumed sweep job: keep or restore the earlier .hydra/ files
            from trainers.cli.hydra_callbacks import settle_hydra_files

            settle_hydra_files(run_dir, keep_new=bool(status.get("may_write")))
    return result
