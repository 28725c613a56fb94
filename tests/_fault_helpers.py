"""Fault injection for the reliability tests: callbacks that poison a loss, a gradient, an evaluation or the
weights at chosen steps (loaded by the trainer through ``trainer.callbacks``)."""

from __future__ import annotations

from typing import Any

import torch

from trainers.loop.hooks import TrainerCallback


def _steps(steps: Any) -> set[int]:
    return {int(s) for s in (steps if isinstance(steps, list | tuple) or hasattr(steps, "__iter__") else [steps])}


class NanLossAt(TrainerCallback):
    """Adds a NaN loss term during optimizer steps ``steps`` (1-based: the step being computed). The term has no
    gradient, so only the loss check can see it. Keeps the adapter weights seen before/after each poisoned step."""

    last: NanLossAt | None = None

    def __init__(self, steps: Any) -> None:
        self.steps = _steps(steps)
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        NanLossAt.last = self

    @staticmethod
    def _weights(trainer: Any) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    def on_step_begin(self, trainer: Any) -> None:
        step = trainer.state.global_step + 1
        if step in self.steps:
            self.before[step] = self._weights(trainer)

    def extra_losses(self, trainer: Any, outputs: Any, batch: Any) -> dict[str, torch.Tensor]:
        if trainer.state.global_step + 1 in self.steps:
            return {"poison": torch.tensor(float("nan"))}
        return {}

    def on_step_end(self, trainer: Any) -> None:
        if trainer.state.global_step in self.steps:
            self.after[trainer.state.global_step] = self._weights(trainer)


class NanGradAt(TrainerCallback):
    """Turns every gradient of one trainable parameter into NaN during optimizer step ``step`` (the loss stays
    finite, so only the gradient-norm check can see it)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_begin(self, trainer: Any) -> None:
        param = trainer.trainable[0]
        param.register_hook(lambda g: g * float("nan") if trainer.state.global_step + 1 == self.step else g)


class NanEvalLoss(TrainerCallback):
    """Reports a NaN evaluation loss term (``aux_loss``) from evaluation ``at`` on (0 = the first)."""

    def __init__(self, at: int = 0) -> None:
        self.at, self.count = int(at), 0

    def eval_metrics(self, trainer: Any) -> dict[str, float]:
        self.count += 1
        return {"aux_loss": float("nan")} if self.count > self.at else {"aux_loss": 0.0}


class PoisonAtRunEnd(TrainerCallback):
    """Writes a NaN into one adapter weight after training (where end-of-run steps such as pruning run)."""

    def on_run_end(self, trainer: Any, result: dict[str, Any]) -> None:
        with torch.no_grad():
            trainer.trainable[0].view(-1)[0] = float("nan")


class PauseAtStart(TrainerCallback):
    """Creates the file ``flag`` when training starts, then waits until the file ``release`` exists or a SIGTERM
    asked the run to stop (at most ``seconds``): a run that is busy in its folder."""

    def __init__(self, flag: str, seconds: float = 5.0, release: str | None = None) -> None:
        self.flag, self.seconds, self.release = flag, float(seconds), release

    def on_train_begin(self, trainer: Any) -> None:
        import time
        from pathlib import Path

        from trainers.core.signals import stop_requested

        Path(self.flag).write_text("started")
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and not (self.release and Path(self.release).exists()):
            if stop_requested():
                return
            time.sleep(0.05)


class SignalAt(TrainerCallback):
    """Sends ``signal`` (a name, e.g. SIGTERM) to this process right after optimizer step ``step``."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step, self.signal = int(step), signal

    def on_step_end(self, trainer: Any) -> None:
        import os
        import signal

        if trainer.state.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))


class KillAtTaskStart(TrainerCallback):
    """SIGKILL this process when the Trainer of continual task ``task`` starts (its folder ``tasks/task_{task}``
    exists, no checkpoint of it yet): the moment the issue's continual resume case was killed at."""

    def __init__(self, task: int) -> None:
        self.task = int(task)

    def on_train_begin(self, trainer: Any) -> None:
        import os
        import signal

        if trainer.run_dir.name == f"task_{self.task}":
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonWeightsAt(TrainerCallback):
    """Writes an infinity into one adapter weight right after optimizer step ``step`` (before its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_step_end(self, trainer: Any) -> None:
        if trainer.state.global_step == self.step:
            with torch.no_grad():
                trainer.trainable[0].view(-1)[0] = float("inf")


class DiskFullAt(TrainerCallback):
    """At optimizer step ``step``: makes every log file handler fail (as on a full disk), then raises ENOSPC as a
    checkpoint write would."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_step_end(self, trainer: Any) -> None:
        import errno
        import logging

        if trainer.state.global_step != self.step:
            return
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and handler.stream is not None:
                handler.stream.close()  # every later log line fails to write
        logging.getLogger(__name__).warning("a log line the full disk cannot take")
        raise OSError(errno.ENOSPC, "No space left on device", str(trainer.run_dir / "checkpoints"))
