"""The training loop: one loop for every method, extended through :class:`TrainerCallback` hooks.

The loop knows no method: a method plug-in contributes its optimizers (:class:`OptimizerSpec`), its
callbacks (extra losses, per-step updates, evaluation metrics, stage and end-of-run steps) and its stage
parameters; the loop builds and steps whatever it is given.

Exact resume: the data order is a function of (seed, epoch), the position inside an epoch is saved,
DataLoaders draw from their own generators (never the global RNG), and the global RNG states are
saved per process in every checkpoint. A run killed at any step and resumed from its newest
checkpoint therefore replays exactly the steps the uninterrupted run took.

Best evaluation: every evaluation is compared by ``trainer.metric_for_best`` (greater is better, except for
names containing ``loss``); the best one's step, value and metrics are part of the state. With
``trainer.load_best_at_end`` its weights are kept in ``checkpoints/best`` and loaded after training, so the
final metrics and the exported adapter are the best evaluation's; ``trainer.early_stopping_patience`` stops
training after that many evaluations without improvement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainers.core.errors import NonFiniteError, RunInterrupted, UserError
from trainers.core.signals import stop_point, stop_requested
from trainers.data.sampling import EpochSampler, ShardSampler, make_loader
from trainers.loop import checkpoint as ckpt
from trainers.loop.hooks import TrainerCallback
from trainers.loop.metrics_log import MetricsWriter
from trainers.loop.nonfinite import all_finite, nonfinite_losses, nonfinite_names
from trainers.loop.optimizers import OptimizerSpec, build_optimizers, build_scheduler
from trainers.loop.stages import Stage
from trainers.loop.state import TrainerState
from trainers.objectives import EvalContext, Objective

log = logging.getLogger(__name__)


def total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """||g||_2 over the gradients of ``params`` taken together (as ``clip_grad_norm_`` computes it), on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class Trainer:
    """Trains ``model`` (already wrapped with an adapter) on ``data`` through ``stages``.

    ``optimizer_specs(model)`` gives the optimizers (called again when a stage resets them); ``objective``
    scores training batches and evaluates. ``started_at`` (``time.perf_counter()``) is when this process's
    run began, for ``wall_time_s``.
    """

    def __init__(self, cfg: DictConfig, model: nn.Module, data: Any, collate: Any,
                 accelerator: Accelerator, run_dir: Path, stages: list[Stage],
                 optimizer_specs: Callable[[nn.Module], list[OptimizerSpec]], objective: Objective,
                 callbacks: list[TrainerCallback] | None = None, started_at: float | None = None) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.stages = stages
        self.callbacks = list(callbacks or [])
        self.data = data
        self.collate = collate
        self.objective = objective  # training scores and evaluation metrics
        self.state = TrainerState()
        self.writer = MetricsWriter(self.run_dir, enabled=accelerator.is_main_process)
        self.seed = int(cfg.seed)
        self.is_main = accelerator.is_main_process
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes

        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer_specs = optimizer_specs
        self._specs = optimizer_specs(model)
        self.optimizers: dict[str, torch.optim.Optimizer] = build_optimizers(self._specs)
        self.schedulers: dict[str, Any] = {}
        self._running: dict[str, torch.Tensor] = {}  # device-side sums since the last log line (no host sync)
        self.log_due = False  # whether the optimizer step in progress will be logged (callbacks may read it)
        self._grad_norm: torch.Tensor | None = None  # global gradient norm of the last logged step (on the device)
        self._step_sums: dict[str, torch.Tensor] = {}  # the current optimizer step's sums (dropped if it is skipped)
        self.ddp_model = accelerator.prepare(model)
        # trainer.compile: the training forward/backward runs through torch.compile's wrapper; evaluation,
        # no_sync and checkpoints keep using the plain modules (state dict keys without ``_orig_mod.``)
        self.train_model = torch.compile(self.ddp_model) if self.tcfg.get("compile", False) else self.ddp_model

        by_length = self.tcfg.group_by_length and "input_ids" in data.train[0]  # text only
        lengths = [len(ex["input_ids"]) for ex in data.train] if by_length else None
        self.sampler = EpochSampler(len(data.train), self.seed, self.rank, self.world_size, lengths=lengths,
                                    batch_size=self.tcfg.batch_size)
        self.batches_per_epoch = math.ceil(self.sampler.shard_size / self.tcfg.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.tcfg.grad_accum_steps)
        self.pin_memory = accelerator.device.type == "cuda"  # page-locked batches: non-blocking copies to the GPU
        self.eval_loader = make_loader(data.eval, ShardSampler(len(data.eval), self.rank, self.world_size),
                                       self.tcfg.eval_batch_size, collate, self.tcfg.num_workers, self.seed,
                                       pin_memory=self.pin_memory)
        self._resumed_stage: int | None = None
        self._pending: dict[str, Any] = {}
        self._last_saved_step = -1
        self._stop: str | None = None  # a signal asked to stop: checkpoint and stop after this step
        self._first_bad: torch.Tensor | None = None  # deferred non-finite check: first bad step (device), -1 none
        self._bad_values: dict[str, torch.Tensor] = {}  # that step's losses and gradient norm (device)
        self._segment_start = started_at if started_at is not None else time.perf_counter()
        self._progress: tuple[float, int, int] | None = None  # (time, global step, samples) when training began here
        self._loss_shown = False  # the console shows a loss from the first step on, logged or not
        self.eval_every_epochs = int(self.tcfg.get("eval_every_epochs", 0) or 0)
        self.metric_for_best = str(self.tcfg.get("metric_for_best", "eval_score"))
        self.load_best_at_end = bool(self.tcfg.get("load_best_at_end", False))
        self.patience = int(self.tcfg.get("early_stopping_patience", 0) or 0)
        self.track_best = self.load_best_at_end or self.patience > 0

    # ----------------------------------------------------------------------------------------- helpers
    def stage_steps(self, stage: Stage) -> int:
        """Optimizer steps of ``stage``."""
        return stage.max_steps if stage.max_steps else stage.epochs * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps(s) for s in self.stages)

    def eval_context(self) -> EvalContext:
        """What the objective's evaluation may use."""
        return EvalContext(self.model, self.accelerator, self.run_dir, self.state.global_step,
                           int(self.tcfg.eval_batch_size))

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def wall_time(self) -> float:
        return self.state.wall_time_s + time.perf_counter() - self._segment_start

    # ----------------------------------------------------------------------------------------- stages
    def _start_stage(self, stage: Stage, resumed: bool) -> None:
        steps = self.stage_steps(stage)
        if not resumed and stage.reset_optimizers and self.state.global_step > 0:
            self._specs = self.optimizer_specs(self.model)
            self.optimizers = build_optimizers(self._specs)
        specs = {spec.name: spec for spec in self._specs}
        kind, kwargs = self.tcfg.get("lr_scheduler", "linear"), self.tcfg.get("lr_scheduler_kwargs") or {}
        self.schedulers = {name: build_scheduler(specs[name], opt, steps, kind, kwargs)
                           for name, opt in self.optimizers.items()}
        if resumed:  # optimizer states after the schedulers are built (building one resets the lr)
            objects = self._pending.pop("objects")
            for name, opt in self.optimizers.items():
                opt.load_state_dict(objects["optimizers"][name])
                self.schedulers[name].load_state_dict(objects["schedulers"][name])
            if self.accelerator.scaler is not None and objects.get("scaler"):
                self.accelerator.scaler.load_state_dict(objects["scaler"])
        else:
            self._call("on_stage_begin", stage)

    # ----------------------------------------------------------------------------------------- train
    def train(self) -> dict[str, float]:
        """Run the remaining stages; return the final evaluation metrics.

        A SIGTERM while training (``trainers.core.signals``) ends the current optimizer step, saves a checkpoint
        and raises :class:`RunInterrupted` naming it."""
        with stop_point():
            return self._train()

    def _train(self) -> dict[str, float]:
        self._call("on_train_begin")
        if self.tcfg.get("eval_at_start") and self.state.global_step == 0:
            self.evaluate_if_needed()  # the score before any training (logged as the step-0 eval line)
        rng = self._pending.pop("rng", None)
        if rng is not None:  # last, after every model/optimizer construction that could draw numbers
            ckpt.set_rng_state(rng)
        while self.state.stage_index < len(self.stages) and not self.state.stopped_early:
            index = self.state.stage_index
            stage = self.stages[index]
            self._start_stage(stage, resumed=self._resumed_stage == index)
            self._run_stage(stage)
            if self.state.stopped_early:
                break
            metrics = self.evaluate_if_needed()
            self._call("on_stage_end", stage, metrics)
            self.state.stage_index += 1
            self.state.stage_step = 0
        metrics = self.evaluate_if_needed()
        if self._last_saved_step != self.state.global_step:
            self.save_checkpoint()
        if self.load_best_at_end:
            metrics = self._restore_best(metrics)
        self._call("on_train_end", metrics)
        return metrics

    def _run_stage(self, stage: Stage) -> None:
        with logging_redirect_tqdm():  # log lines go above the progress bar instead of breaking it
            self._run_stage_steps(stage)

    def _run_stage_steps(self, stage: Stage) -> None:
        total = self.stage_steps(stage)
        accum = self.tcfg.grad_accum_steps
        desc = "train" if len(self.stages) == 1 else f"stage {stage.name}"
        bar = tqdm(total=total, initial=self.state.stage_step, desc=desc, dynamic_ncols=True, leave=True,
                   disable=None if self.is_main else True)  # None: a bar on terminals only
        self.ddp_model.train()
        if self._progress is None:
            self._progress = (time.perf_counter(), self.state.global_step, self.state.samples_seen)
        while self.state.stage_step < total and not self.state.stopped_early:
            self.sampler.set_epoch(self.state.epoch, self.state.batch_in_epoch * self.tcfg.batch_size)
            loader = make_loader(self.data.train, self.sampler, self.tcfg.batch_size, self.collate,
                                 self.tcfg.num_workers, self.seed + self.state.epoch, pin_memory=self.pin_memory)
            for batch in loader:
                i = self.state.batch_in_epoch
                group_start = (i // accum) * accum
                group_size = min(accum, self.batches_per_epoch - group_start)
                if i == group_start:
                    self._call("on_step_begin")
                is_step = i + 1 - group_start == group_size
                self._micro_step(batch, group_size, sync=is_step)
                self.state.batch_in_epoch += 1
                if is_step:
                    self.log_due = self._log_due(self.state.global_step + 1, self.state.stage_step + 1, total)
                    self._optimizer_step()
                    bar.update(1)
                    self._after_step(stage, total, bar)
                    if self._stop is not None:
                        bar.close()
                        self._interrupt(self._stop)
                    if self.state.stage_step >= total or self.state.stopped_early:
                        break
            if self.state.batch_in_epoch >= self.batches_per_epoch:  # epoch done: next permutation
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
        bar.close()

    def _micro_step(self, batch: dict[str, torch.Tensor], group_size: int, sync: bool) -> None:
        start = time.perf_counter()
        batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
        no_sync = not sync and self.world_size > 1  # accumulate locally, all-reduce on the last micro-batch
        with self.accelerator.no_sync(self.ddp_model) if no_sync else contextlib.nullcontext():
            with self.accelerator.autocast():
                outputs = self.train_model(**batch)
                extras = {}
                for callback in self.callbacks:
                    extras.update(callback.extra_losses(self, outputs, batch))
                loss = outputs.loss + sum(extras.values()) if extras else outputs.loss
            self.accelerator.backward(loss / group_size)
        n = batch["labels"].shape[0]
        self._accumulate("loss_sum", outputs.loss.detach() * n, self._step_sums)
        self._accumulate("correct", self.objective.batch_correct(outputs, batch), self._step_sums)
        self._accumulate("count", n, self._step_sums)
        for name, value in extras.items():
            self._accumulate(f"{name}_sum", value.detach() * n, self._step_sums)
        self.state.samples_seen += n * self.world_size
        self.state.train_time_s += time.perf_counter() - start

    def _accumulate(self, name: str, value: torch.Tensor | float, into: dict[str, torch.Tensor] | None = None) -> None:
        """Add to a running sum kept on the device (read at log and checkpoint steps only)."""
        sums = self._running if into is None else into
        value = torch.as_tensor(value, device=self.accelerator.device).to(torch.float64)
        sums[name] = sums[name] + value if name in sums else value

    def _flush_running(self) -> None:
        """Move the device-side sums into ``state.running`` (one host copy)."""
        if not self._running:
            return
        names = list(self._running)
        values = torch.stack([self._running[k] for k in names]).tolist()
        running = self.state.running
        for name, value in zip(names, values, strict=True):
            running[name] = running.get(name, 0.0) + value
        self._running = {}

    def _optimizer_step(self) -> None:
        start = time.perf_counter()
        scaler = self.accelerator.scaler
        if scaler is not None:
            for opt in self.optimizers.values():
                scaler.unscale_(opt)
        self._call("on_before_optimizer_step")
        if self.tcfg.max_grad_norm > 0:  # the norm before clipping comes for free; stays on the device
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, float(self.tcfg.max_grad_norm))
        else:  # a few device ops on the adapter's gradients: needed for the non-finite check
            norm = total_grad_norm(self.trainable)
        if self.log_due:
            self._grad_norm = norm
        skip = not self._check_step(norm, scaler is not None)  # raises unless the step may be skipped
        if not skip:
            for opt in self.optimizers.values():
                if scaler is not None:
                    scaler.step(opt)
                else:
                    opt.step()
            for name, value in self._step_sums.items():  # a skipped step's losses stay out of the logged means
                self._running[name] = self._running[name] + value if name in self._running else value
        if scaler is not None:
            scaler.update()
        self._step_sums = {}
        for sched in self.schedulers.values():
            sched.step()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.state.stage_step += 1
        self.state.train_time_s += time.perf_counter() - start
        self._call("on_step_end")

    def _log_due(self, step: int, stage_step: int, total: int) -> bool:
        """Whether optimizer step ``step`` (``stage_step`` of ``total`` in its stage) writes a training line."""
        return step % self.tcfg.log_every_steps == 0 or stage_step == total

    def _check_step(self, norm: torch.Tensor | None, scaled: bool) -> bool:
        """True if this step's losses (and, without a grad scaler, its gradient norm) are finite; also notes
        a stop request (SIGTERM) so that every process stops after this step.

        With ``trainer.on_nonfinite=stop`` on one process the check stays on the device: the first bad step
        and its values are kept there and read at the next read point (:meth:`_raise_if_nonfinite`, before
        anything is logged, evaluated or saved), so a step between log steps reads nothing back from the device.
        Otherwise (``skip_step``, or several processes, which must agree) it reads one flag per optimizer step,
        and ``trainer.on_nonfinite`` decides: ``skip_step`` returns
        False (the caller drops the update) up to ``trainer.max_skipped_steps`` times; ``stop`` (and a skip
        beyond that count) raises :class:`NonFiniteError`. With a grad scaler (fp16) infinite gradients are
        the scaler's business (it skips those steps itself), so only the losses are checked.
        """
        named = dict(self._step_sums)
        if norm is not None and not scaled:
            named["grad_norm"] = norm
        if self.world_size == 1 and self.tcfg.get("on_nonfinite", "stop") == "stop":
            self._stop = self._stop or stop_requested()
            self._note_nonfinite(named)
            return True
        nonfinite = ~all_finite(list(named.values()))
        asked = torch.tensor(stop_requested() is not None, device=nonfinite.device)
        flags = torch.stack([nonfinite, asked]).to(torch.float32)
        if self.world_size > 1:  # every process takes the same decisions (one collective for both flags)
            flags = self.accelerator.reduce(flags.to(self.accelerator.device), reduction="sum")
        bad, stop = (v > 0 for v in flags.tolist())  # the one host sync of the step
        if stop:
            self._stop = stop_requested() or "SIGTERM"  # (a signal on another process)
        if not bad:
            return True
        step = self.state.global_step + 1
        losses = {k: v for k, v in self._step_sums.items() if k.endswith("_sum")}
        what = [f"loss term {k[:-4]}" if k != "loss_sum" else "loss" for k in nonfinite_names(losses)]
        if norm is not None and not scaled and not bool(torch.isfinite(norm)):
            what.append("gradient norm")
        reason = "non-finite " + (" and ".join(what) or "value on another process")
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        allowed = int(self.tcfg.get("max_skipped_steps", 0))
        if self.tcfg.get("on_nonfinite", "stop") == "skip_step" and self.state.skipped_steps < allowed:
            self.state.skipped_steps += 1
            if self.is_main:
                log.warning("step %d skipped (%s): %d of %d tolerated skips used", step, reason,
                            self.state.skipped_steps, allowed)
            return False
        self._step_sums = {}
        raise self._nonfinite(step, reason)

    def _note_nonfinite(self, named: dict[str, torch.Tensor]) -> None:
        """Keep, on the device, the first step whose ``named`` values are not all finite, and those values."""
        step = self.state.global_step + 1
        bad = ~all_finite(list(named.values()))
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
        first = bad & (self._first_bad < 0)
        self._first_bad = torch.where(first, torch.full_like(self._first_bad, step), self._first_bad)
        for name, value in named.items():
            value = value.detach().reshape(()).to(torch.float64)
            kept = self._bad_values.get(name, torch.zeros_like(value))
            self._bad_values[name] = torch.where(first, value, kept)

    def _raise_if_nonfinite(self) -> None:
        """A read point of the deferred non-finite check: raise for the first bad step since the last one."""
        if self._first_bad is None:
            return
        step = int(self._first_bad)  # the one host read, at log / eval / save steps only
        if step < 0:
            return
        what = [f"loss term {k[:-4]}" if k != "loss_sum" else "loss"
                for k in nonfinite_names({k: v for k, v in self._bad_values.items() if k.endswith("_sum")})]
        if "grad_norm" in self._bad_values and nonfinite_names({"g": self._bad_values["grad_norm"]}):
            what.append("gradient norm")
        self._first_bad, self._bad_values = None, {}
        raise self._nonfinite(step, "non-finite " + (" and ".join(what) or "value"))

    def _interrupt(self, signal: str) -> None:
        """Checkpoint the step just done (unless it is saved already) and stop the run."""
        self._raise_if_nonfinite()
        path = (ckpt.checkpoint_root(self.run_dir) / ckpt.step_name(self.state.global_step)
                if self._last_saved_step == self.state.global_step else self.save_checkpoint())
        if self.is_main:
            log.warning("stopped by %s after step %d; checkpoint %s", signal, self.state.global_step, path)
        raise RunInterrupted(signal, self.state.global_step, str(path))

    def _nonfinite(self, step: int, reason: str) -> NonFiniteError:
        """The error that stops a run at ``step``; names the last checkpoint with finite weights."""
        last = ckpt.latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written"
        if self.tcfg.get("on_nonfinite") == "skip_step":
            hint = f"{self.state.skipped_steps} step(s) were skipped already, the most trainer.max_skipped_steps allows"
        else:
            hint = "lower trainer.base_lr, or set trainer.on_nonfinite=skip_step to skip such steps"
        return NonFiniteError(f"training stopped at step {step}: {reason}; nothing of this step was saved, {kept} "
                              f"({hint})", {"step": step, "reason": reason})

    def _after_step(self, stage: Stage, total: int, bar: Any) -> None:
        step = self.state.global_step
        if self._log_due(step, self.state.stage_step, total):
            record = self._log_train(stage)
            self._show_progress(bar, record["loss"], record["accuracy"])
        elif not self._loss_shown:  # the first step: show its loss without a metrics.jsonl line
            self._show_progress(bar, *self._peek_running())
        epoch_done = self.state.batch_in_epoch >= self.batches_per_epoch  # this step ended an epoch
        if ((self.tcfg.eval_every_steps and step % self.tcfg.eval_every_steps == 0)
                or (self.eval_every_epochs and epoch_done and (self.state.epoch + 1) % self.eval_every_epochs == 0)):
            self.evaluate_if_needed()
        is_last = self.state.stage_index == len(self.stages) - 1 and self.state.stage_step == total
        if self.tcfg.save_every_steps and step % self.tcfg.save_every_steps == 0 and not is_last:
            self.save_checkpoint()  # the final checkpoint is written after the final evaluation

    def _peek_running(self) -> tuple[float, float]:
        """This process's mean loss and accuracy since the last log line, leaving the running sums as they are."""
        sums = dict(self.state.running)
        for name, value in self._running.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        count = max(sums.get("count", 0.0), 1.0)
        return sums.get("loss_sum", 0.0) / count, sums.get("correct", 0.0) / count

    def progress_line(self, loss: float, accuracy: float) -> str:
        """``step 40/938: loss 0.5120, accuracy 0.7500, 210.3 samples/s, ETA 0:04:12`` (throughput and ETA over the
        steps this process has trained)."""
        step, total = self.state.global_step, self.total_steps
        line = f"step {step}/{total}: loss {loss:.4f}, accuracy {accuracy:.4f}"
        if self._progress is not None:
            started, first_step, first_samples = self._progress
            elapsed, done = time.perf_counter() - started, step - first_step
            if elapsed > 0 and done > 0:
                eta = round(elapsed / done * max(total - step, 0))
                line += (f", {(self.state.samples_seen - first_samples) / elapsed:.1f} samples/s, "
                         f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        return line

    def _show_progress(self, bar: Any, loss: float, accuracy: float) -> None:
        self._loss_shown = True
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}")
        if bar.disable and self.is_main:  # no progress bar (not a terminal): a log line instead
            log.info("%s", self.progress_line(loss, accuracy))

    def _log_train(self, stage: Stage) -> dict[str, Any]:
        self._raise_if_nonfinite()
        self._flush_running()
        running = self.state.running
        names = sorted(running)
        sums = torch.tensor([running[k] for k in names], dtype=torch.float64, device=self.accelerator.device)
        if self.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        totals = dict(zip(names, sums.tolist(), strict=True))
        count = max(totals.get("count", 0.0), 1.0)
        record: dict[str, Any] = {
            "step": self.state.global_step, "split": "train", "stage": stage.name,
            "epoch": round(self.state.epoch + self.state.batch_in_epoch / self.batches_per_epoch, 4),
            "loss": totals.get("loss_sum", 0.0) / count, "accuracy": totals.get("correct", 0.0) / count,
            "lr": next(iter(self.optimizers.values())).param_groups[0]["lr"],
        }
        if self._grad_norm is not None:  # the one host read of the gradient norm, at log steps only
            record["grad_norm"] = float(self._grad_norm)
            self._grad_norm = None
        for name in names:
            if name.endswith("_sum") and name != "loss_sum":
                record[name[: -len("_sum")]] = totals[name] / count
        for callback in self.callbacks:
            record.update(callback.log_values(self))
        self.writer.log(record)
        self._call("on_log", record)
        self.state.running = {}
        return record

    # ----------------------------------------------------------------------------------------- eval
    def evaluate_if_needed(self) -> dict[str, float]:
        """Evaluate unless this step was already evaluated; log the result to metrics.jsonl."""
        self._raise_if_nonfinite()
        if self.state.last_eval_step == self.state.global_step and self.state.last_eval:
            return dict(self.state.last_eval)
        metrics = self.evaluate()
        bad = nonfinite_losses(metrics)
        if bad:
            raise self._nonfinite(self.state.global_step, f"non-finite evaluation {', '.join(bad)}")
        self.state.last_eval_step = self.state.global_step
        self.state.last_eval = dict(metrics)
        record = {"step": self.state.global_step, "split": "eval", **metrics}
        self.writer.log(record)
        self._call("on_log", record)
        if self.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            log.info("eval at step %d: %s", self.state.global_step, shown)
        self._update_best(metrics)
        self._call("on_evaluate", metrics)
        return metrics

    def _update_best(self, metrics: dict[str, float]) -> None:
        """Compare this evaluation with the best one by ``trainer.metric_for_best``; keep its weights
        (load_best_at_end) or count it towards early stopping."""
        name = self.metric_for_best
        if name not in metrics:
            if self.track_best:
                raise UserError(f"trainer.metric_for_best={name} is not among the evaluation metrics "
                                f"({', '.join(sorted(metrics))})")
            return
        value = float(metrics[name])
        best = self.state.best_metric
        lower_is_better = "loss" in name
        improved = not math.isnan(value) and (best is None or (value < best if lower_is_better else value > best))
        state = self.state
        if improved:
            state.best_metric, state.best_step, state.best_eval = value, state.global_step, dict(metrics)
            state.evals_without_improvement = 0
            if self.load_best_at_end:
                self.save_checkpoint(ckpt.BEST_NAME)
            return
        state.evals_without_improvement += 1
        if self.patience and state.evals_without_improvement >= self.patience:
            state.stopped_early = True
            if self.is_main:
                log.info("early stopping at step %d: %s has not improved on %.4f (step %d) for %d evaluations",
                         state.global_step, name, best if best is not None else float("nan"), state.best_step,
                         state.evals_without_improvement)

    def _restore_best(self, metrics: dict[str, float]) -> dict[str, float]:
        """Load the weights of the best evaluation (``checkpoints/best``) unless the model already is that one;
        return that evaluation's metrics."""
        from adapters import load_adapter_state_dict

        state = self.state
        if state.best_step < 0:
            return metrics
        if state.best_step != state.global_step:
            path = ckpt.checkpoint_root(self.run_dir) / ckpt.BEST_NAME
            load_adapter_state_dict(self.model, ckpt.load_weights(path))
            if self.is_main:
                log.info("loaded the best checkpoint: step %d, %s %.4f", state.best_step, self.metric_for_best,
                         state.best_metric)
        return dict(state.best_eval)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's metrics over the evaluation set, plus the callbacks' ``eval_metrics``."""
        model = self.model
        was_training = model.training
        model.eval()
        metrics = self.objective.evaluate(self.eval_context(), self.eval_loader)
        model.train(was_training)
        for callback in self.callbacks:
            metrics.update(callback.eval_metrics(self))
        return metrics

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, name: str | None = None) -> Path:
        """Write the full training state atomically to ``checkpoints/<name>`` (default ``step-NNNNNNNN``,
        the checkpoints resume=auto and pruning consider; another name, e.g. per stage, is kept as is).
        Every process must call this."""
        self._raise_if_nonfinite()
        from adapters import adapter_state_dict

        step = self.state.global_step
        name = name or ckpt.step_name(step)
        bad = nonfinite_names(adapter_state_dict(self.model))
        if bad:  # never save weights no resume could use
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise self._nonfinite(step, f"non-finite weights in {bad[0]}{more}")
        self._flush_running()
        self.state.metrics_lines = self.writer.num_lines
        state = dataclasses.asdict(self.state)
        state["wall_time_s"] = self.wall_time()
        if self.is_main:
            ckpt.prepare_temporary(self.run_dir, name)
        self.accelerator.wait_for_everyone()
        tmp = ckpt.temporary_dir(self.run_dir, name)
        ckpt.write_rng(tmp, self.rank)
        if self.is_main:
            objects = {
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            }
            meta = {"state": state, "config": ckpt.config_fingerprint(self.cfg), "world_size": self.world_size,
                    "callbacks": [c.state_dict() for c in self.callbacks],
                    "callback_types": [type(c).__name__ for c in self.callbacks]}
            ckpt.write_main(tmp, adapter_state_dict(self.model), objects, meta)
        self.accelerator.wait_for_everyone()
        final = ckpt.checkpoint_root(self.run_dir) / name
        if self.is_main:
            ckpt.publish(self.run_dir, name, int(self.tcfg.keep_last_checkpoints))
        self.accelerator.wait_for_everyone()
        if name == ckpt.step_name(step):
            self._last_saved_step = step
        return final

    def load_checkpoint(self, path: Path, source_run: Path | None = None) -> None:
        """Restore everything from the checkpoint at ``path`` (UserError if it is corrupt or does not fit).

        ``source_run``: copy that run's metrics.jsonl (up to the checkpoint) when resuming into a new folder.
        """
        from adapters import load_adapter_state_dict

        meta = ckpt.check_compatible(path, self.cfg, self.world_size)
        weights, objects, _, rng = ckpt.load_checkpoint(path, self.rank)
        try:
            load_adapter_state_dict(self.model, weights)
        except ValueError as exc:
            raise UserError(f"checkpoint {path} does not fit this model: {exc}") from None
        try:
            fields = {f.name for f in dataclasses.fields(TrainerState)}
            self.state = TrainerState(**{k: v for k, v in meta["state"].items() if k in fields})
            self._load_callback_states(meta)
            saved = sorted(objects["optimizers"])
            if saved != sorted(self.optimizers) or sorted(objects["schedulers"]) != saved:
                raise ValueError(f"it holds optimizers {saved}, this run has {sorted(self.optimizers)}")
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"corrupt checkpoint {path}: {exc}") from None
        self._pending = {"objects": objects, "rng": rng}
        self._resumed_stage = self.state.stage_index if self.state.stage_index < len(self.stages) else None
        if self._resumed_stage is None:  # training was finished: nothing left to load into
            self._pending.pop("objects")
        self._last_saved_step = self.state.global_step
        self.writer.restart(self.state.metrics_lines, source_run)
        log.info("resumed from %s (step %d)", path, self.state.global_step)

    def _load_callback_states(self, meta: dict[str, Any]) -> None:
        """Give every callback the saved state of the same class (in order), so adding or removing a user
        callback on resume (``trainer.callbacks`` may change) does not lose the adapter hooks' states."""
        states = meta.get("callbacks", [])
        types = meta.get("callback_types")
        if types is None:  # older checkpoints: by position, when the count matches
            if len(states) == len(self.callbacks):
                for callback, cb_state in zip(self.callbacks, states, strict=True):
                    callback.load_state_dict(cb_state)
            return
        saved = list(zip(types, states, strict=True))
        for callback in self.callbacks:
            match = next((i for i, (kind, _) in enumerate(saved) if kind == type(callback).__name__), None)
            if match is not None:
                callback.load_state_dict(saved.pop(match)[1])

    def start_fresh(self) -> None:
        """Begin a new run: empty metrics.jsonl."""
        self.writer.restart(0)

    def final_metrics(self, metrics: dict[str, float]) -> dict[str, Any]:
        """What ``metrics.json`` holds when training finished."""
        from adapters import count_trainable_parameters

        train_time = self.state.train_time_s
        result: dict[str, Any] = dict(metrics)
        result.update({
            "trainable_params": int(count_trainable_parameters(self.model)),
            "train_samples_per_second": self.state.samples_seen / train_time if train_time > 0 else None,
            "wall_time_s": self.wall_time(),
            "global_step": self.state.global_step,
            "train_samples": self.state.samples_seen,
            "status": "completed",
        })
        if self.track_best:
            result.update({"best_step": self.state.best_step, "best_metric": self.state.best_metric,
                           "stopped_early": self.state.stopped_early})
        if self.tcfg.get("on_nonfinite") == "skip_step":
            result["skipped_steps"] = self.state.skipped_steps
        return result
