"""Helpers for the trainer/CLI tests; ``KillAt`` is also loaded by `python main.py` as a trainer callback."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainers.loop.hooks import TrainerCallback


class KillAt(TrainerCallback):
    """SIGKILL (or ``sig``) this process at optimizer step ``step`` (counted as steps already done), at one of:

    ``step_end``: right after the optimizer step, before that step's logging / eval / checkpoint;
    ``mid_step``: inside the next step, after a forward pass (gradients half accumulated);
    ``step_begin``: before the next step, after everything due at ``step`` (log, eval, save) ran.
    """

    def __init__(self, step: int, where: str = "step_end", sig: str = "SIGKILL") -> None:
        assert where in ("step_end", "mid_step", "step_begin")
        self.step, self.where, self.sig = int(step), where, getattr(signal, sig)

    def _maybe_kill(self, trainer: Any, where: str) -> None:
        if where == self.where and trainer.state.global_step == self.step:
            os.kill(os.getpid(), self.sig)

    def on_step_end(self, trainer: Any) -> None:
        self._maybe_kill(trainer, "step_end")

    def on_step_begin(self, trainer: Any) -> None:
        self._maybe_kill(trainer, "step_begin")

    def extra_losses(self, trainer: Any, outputs: Any, batch: Any) -> dict:
        self._maybe_kill(trainer, "mid_step")
        return {}


class FailInJob(TrainerCallback):
    """Fails the run when training begins, in the sweep job numbered ``job`` only."""

    def __init__(self, job: int) -> None:
        self.job = int(job)

    def on_train_begin(self, trainer: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().job.num == self.job:
            raise RuntimeError(f"planned failure in job {self.job}")


class Recorder(TrainerCallback):
    """Records the names of the hooks called, in order (the last instance is ``Recorder.last``)."""

    last: Recorder | None = None

    def __init__(self) -> None:
        self.calls: list[str] = []
        Recorder.last = self

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if name.startswith("on_"):
            object.__getattribute__(self, "calls").append(name)
        return attr


class SaveStage(TrainerCallback):
    """Keeps a named checkpoint of every stage (as the xi-stage schedule will)."""

    def on_stage_end(self, trainer: Any, stage: Any, metrics: dict[str, float]) -> None:
        trainer.save_checkpoint(f"stage-{stage.name}")


# --------------------------------------------------------------------------------------------- running main.py
REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "main.py"
# a tiny, fast, fully offline run: random 2-layer BERT, a few SST-2 examples
TINY = ["model=tiny-random-bert", "dataset.max_train_samples=48", "dataset.max_eval_samples=24",
        "trainer.batch_size=8", "trainer.eval_batch_size=16", "trainer.log_every_steps=2"]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for `python main.py` in tests: offline, one thread, no inherited HYDRA_FULL_ERROR."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LORA_LAB_RUN_ID")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               DATA_ROOT=os.environ.get("DATA_ROOT", str(REPO.parent / "shared" / "data")),
               PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def run_main(args: list[str], cwd: Path = REPO, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``python main.py *args``; returns the completed process (text stdout/stderr)."""
    return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, env=cli_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """Non-empty stderr lines, without tqdm progress bars."""
    return [line for line in proc.stderr.splitlines() if line.strip() and "it/s" not in line and "s/it" not in line]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def jsonl(run_dir: Path, split: str | None = None) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (only those of ``split``, "train" or "eval", when given)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if split is None or r.get("split") == split]


TIMING_KEYS = ("train_samples_per_second", "wall_time_s")


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(proc, *fragments: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]
