"""What ``main.py`` does around Hydra: one-line errors, and agreeing on one run folder under DDP.

Kept free of torch/transformers imports so that config errors and ``--help`` are fast.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from trainers.cli.run_id import register_resolvers, run_id, set_run_id
from trainers.core.errors import RunInterrupted, RunRefused, UserError

DIST_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# Overrides for processes other than the main one: Hydra's own files and logs are written once.
NON_MAIN_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled")


def _world_size() -> int:
    for name in DIST_SIZE_ENV:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def _share_run_id() -> bool:
    """Under DDP: start the process group, take process 0's run id everywhere. Returns is-main-process."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as the Accelerator will do
    shared = broadcast_object_list([run_id() if state.is_main_process else None], from_process=0)
    set_run_id(shared[0])
    return state.is_main_process


def format_error(exc: BaseException) -> str:
    """One line for any error: ours as is, Hydra/OmegaConf composition errors condensed."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, UserError | RunRefused):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return (f"no space left on device{where}; free some space, then continue with resume=auto and the same "
                f"hydra.run.dir (checkpoints are written atomically: the last complete one is kept)")
    if isinstance(exc, MissingConfigException) and exc.options is not None:
        missing = exc.missing_cfg_file or ""
        group, _, option = missing.rpartition("/")
        if group:
            return f"unknown {group} option {option!r} (choose from: {', '.join(sorted(exc.options))})"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override {exc.override!r}: {lines[0] if lines else ''} (see python main.py --help)"
    cause = exc.__cause__
    if cause is not None and "not in struct" in str(cause):
        key = getattr(cause, "full_key", None) or getattr(cause, "key", "")
        return f"unknown config key '{key}' (see conf/ for the valid keys)"
    kind = type(exc).__name__
    text = " ".join(lines[:2]) if lines else kind
    known = ("ConfigCompositionException", "MissingConfigException", "HydraException")
    if kind in known or kind.startswith(("Config", "Validation", "Interpolation", "Missing")):
        return text
    return f"{kind}: {text} (set HYDRA_FULL_ERROR=1 for the traceback)"


class _CliState:
    """Set by :func:`run_cli`; a single run's task stores its error here instead of raising through Hydra
    (which would print more lines)."""

    active = False
    full_error = False
    failure: BaseException | None = None
    resume_hint: str | None = None  # set by an interrupted job: its folder and the command that continues it
    sweep_jobs: dict[str, str | None] = {}  # job folder -> refusal (None: the job ran)


def note_sweep_job(job_dir: str, refused: str | None) -> None:
    """Called by every sweep job of this launch: ``refused`` is why it could not take its folder over (None: it
    ran, whatever the outcome). A sweep with refused jobs exits non-zero."""
    _CliState.sweep_jobs[job_dir] = refused


def sweep_jobs() -> dict[str, str | None]:
    """The sweep jobs this process launched so far: job folder -> why it was refused (None: it ran)."""
    return dict(_CliState.sweep_jobs)


def note_interrupted(hint: str) -> None:
    """Called by an interrupted job: what the CLI's interrupt message says after ``interrupted``."""
    _CliState.resume_hint = hint


def report_failure(exc: BaseException) -> bool:
    """Called by a failing single-run task: True if the CLI will report ``exc`` (the task should return)."""
    if not _CliState.active or _CliState.full_error:
        return False
    _CliState.failure = exc
    return True


def run_cli(hydra_main: Callable[[], Any]) -> None:
    """Run the ``@hydra.main`` function; print any error as ``error: <one line>`` and exit 1.

    With ``HYDRA_FULL_ERROR=1`` errors propagate with their traceback, as Hydra does.
    """
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    is_main = True
    if _world_size() > 1:
        is_main = _share_run_id()
        if not is_main:
            sys.argv.extend(NON_MAIN_OVERRIDES)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra re-raise, so the error is reported here
    if not full_error:  # a log file that cannot be written (disk full) must not print tracebacks of its own
        logging.raiseExceptions = False
    _CliState.active, _CliState.full_error, _CliState.failure = True, full_error, None
    _CliState.resume_hint = None
    _CliState.sweep_jobs = {}
    try:
        hydra_main()
        error = _CliState.failure
        refused = {job: why for job, why in _CliState.sweep_jobs.items() if why is not None}
        if error is None and refused:
            first, why = next(iter(refused.items()))
            error = UserError(f"{len(refused)} of {len(_CliState.sweep_jobs)} sweep jobs were refused and left as "
                              f"they were (first: {first}: {why})")
    except (Exception, RunRefused) as exc:
        if full_error:
            raise
        error = exc
    except (KeyboardInterrupt, RunInterrupted) as exc:
        if is_main:
            hint = _CliState.resume_hint or ("continue the run with resume=auto and the same hydra.run.dir "
                                             "(or hydra.sweep.dir)")
            if isinstance(exc, RunInterrupted) and exc.checkpoint:
                what = f"stopped by {exc.signal} after step {exc.step}, checkpoint {exc.checkpoint} saved"
            else:
                what = f"interrupted by {getattr(exc, 'signal', 'SIGINT')}"
            print(f"error: {what}; {hint}", file=sys.stderr, flush=True)
        sys.exit(143 if isinstance(exc, RunInterrupted) else 130)
    if error is not None:
        if is_main:
            print(f"error: {format_error(error)}", file=sys.stderr, flush=True)
        sys.exit(1)


__all__ = ["format_error", "register_resolvers", "run_cli"]
