"""The continual (class-incremental) runner: the task loop around the one :class:`~trainers.loop.trainer.Trainer`.

For task t = 0..T-1 (one Trainer per task from the run's :class:`Session`, its run folder ``tasks/task_{t}/``
with its own checkpoints):

1. ``set_seed(seed + t)``; for t > 0 the method's ``begin_task`` (Gumbel CL-LoRA, SD-LoRA: freeze and
   normalise the earlier directions, open direction t; other methods keep training the same weights:
   sequential fine-tuning). The task trains with the method's ``task_config`` (SD-LoRA: the first task's
   own epochs and learning rate).
2. Train on task t's examples. The classifier head is full-size with the logits of other classes
   masked (:class:`HeadMask`): training sees only task t's classes (``loss_classes=current``, as
   SD-LoRA) or all seen classes (``seen``); evaluation sees every seen class. A masked logit gets no
   gradient, so this is exactly a head that grows by ``classes_per_task`` rows per task, without a
   second code path (and with fresh optimizers per task the unused rows stay at their init).
3. Test on each seen task: row t of ``acc_matrix``.
4. The method's ``end_task`` (Gumbel: conditional growth, see ``trainers.methods.gumbel``).
5. Save the adapter state after growth (``tasks/task_{t}/final_adapter.safetensors``) and the task
   results (``continual_state.json``): the points ``resume=auto`` continues from. Inside a task the
   Trainer's own checkpoints resume exactly.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from trainers.core.errors import UserError, first_line
from trainers.core.files import atomic_write, atomic_write_text
from trainers.experiments.session import Session
from trainers.loop.hooks import TrainerCallback
from trainers.loop.metrics_log import MetricsWriter, has_results
from trainers.reports.curves import draw_run_curves

log = logging.getLogger(__name__)

STATE_FILE = "continual_state.json"
FINAL_ADAPTER = "final_adapter.safetensors"


# --------------------------------------------------------------------------------------------- head
class HeadMask:
    """Forward hook on the classifier head: logits of classes outside the allowed set become the dtype's
    minimum (softmax weight 0, gradient 0). ``train_classes`` apply in train mode, ``eval_classes`` in eval."""

    def __init__(self, model: nn.Module, num_labels: int) -> None:
        from adapters import find_head

        try:
            self.head = find_head(model)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.num_labels = num_labels
        self.train_mask = torch.ones(num_labels, dtype=torch.bool)
        self.eval_mask = torch.ones(num_labels, dtype=torch.bool)
        self.handle = self.head.register_forward_hook(self._hook)

    @staticmethod
    def _mask(classes: list[int], num_labels: int) -> torch.Tensor:
        mask = torch.zeros(num_labels, dtype=torch.bool)
        mask[list(classes)] = True
        return mask

    def set_classes(self, train_classes: list[int], eval_classes: list[int]) -> None:
        self.train_mask = self._mask(train_classes, self.num_labels)
        self.eval_mask = self._mask(eval_classes, self.num_labels)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        mask = (self.train_mask if module.training else self.eval_mask).to(output.device)
        return output.masked_fill(~mask, torch.finfo(output.dtype).min)


# --------------------------------------------------------------------------------------------- logging
class EpochLog(TrainerCallback):
    """The seed's per-epoch line: ``Task t, Epoch e/E => Loss L (clf=.., sparse=..), tau=.., Train_accy ..``."""

    def __init__(self, task: int, epochs: int, lambda_sparsity: float) -> None:
        self.task, self.epochs, self.lambda_sparsity = task, epochs, float(lambda_sparsity)
        self.sums = {"clf": 0.0, "sparse": 0.0, "correct": 0.0, "count": 0.0}
        self.lines: list[str] = []

    def extra_losses(self, trainer: Any, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from adapters import gumbel_sparsity_loss

        n = float(batch["labels"].shape[0])
        self.sums["clf"] += float(outputs.loss.detach()) * n
        if self.lambda_sparsity > 0:
            self.sums["sparse"] += self.lambda_sparsity * float(gumbel_sparsity_loss(trainer.model).detach()) * n
        self.sums["correct"] += float((outputs.logits.argmax(-1) == batch["labels"]).sum())
        self.sums["count"] += n
        return {}

    def on_step_end(self, trainer: Any) -> None:
        if trainer.state.batch_in_epoch < trainer.batches_per_epoch:
            return
        count = max(self.sums["count"], 1.0)
        clf, sparse = self.sums["clf"] / count, self.sums["sparse"] / count
        tau = next((v for c in trainer.callbacks for k, v in c.log_values(trainer).items() if k == "tau"), None)
        line = (f"Task {self.task}, Epoch {trainer.state.epoch + 1}/{self.epochs} => Loss {clf + sparse:.4f} "
                f"(clf={clf:.4f}, sparse={sparse:.4f})" + (f", tau={tau:.3f}" if tau is not None else "")
                + f", Train_accy {100 * self.sums['correct'] / count:.2f}")
        if trainer.is_main:
            log.info(line)
        self.lines.append(line)
        self.sums = dict.fromkeys(self.sums, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = dict(state.get("sums", self.sums))


# --------------------------------------------------------------------------------------------- the run
def _task_dir(run_dir: Path, task: int) -> Path:
    return Path(run_dir) / "tasks" / f"task_{task}"


def _load_state(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return {"tasks": [], "wall_time_s": 0.0}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"corrupt {path}: {exc}") from None


def _check_resume(run_dir: Path, state: dict[str, Any], cfg: DictConfig, running_cfg: DictConfig) -> None:
    """UserError unless ``cfg`` may continue the run in ``run_dir``: the same rule as a single run's checkpoints
    (``trainers.loop.checkpoint.config_differences``), at a task boundary (the config saved with the tasks
    done) and inside a task (that task's newest checkpoint, written with ``running_cfg``: the method's config of
    that task, e.g. SD-LoRA's first-task epochs and lr)."""
    from trainers.loop import checkpoint as ckpt

    current = ckpt.config_fingerprint(cfg)
    saved = state.get("config")
    if saved is None and state["tasks"]:  # written before the state held its config: the last task's checkpoint
        last = ckpt.latest_checkpoint(_task_dir(run_dir, len(state["tasks"]) - 1))
        saved = ckpt.read_state(last).get("config") if last is not None else None
    if saved is not None:
        diffs = ckpt.config_differences(saved, current)
        if diffs:
            more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise UserError(f"run {run_dir} (after task {len(state['tasks']) - 1}) does not match this config: "
                            f"{'; '.join(diffs[:3])}{more}; repeat the original overrides to resume")
    running = ckpt.latest_checkpoint(_task_dir(run_dir, len(state["tasks"])))
    if running is not None:
        ckpt.check_compatible(running, running_cfg)


def _evaluate_tasks(trainer: Any, data: Any, upto: int, collate: Any,
                    known: dict[int, float]) -> tuple[list[float], list[int]]:
    """Accuracy on each task 0..upto's classes (``known``: already measured) with the trainer's own evaluation,
    its loader swapped for each task's examples."""
    from trainers.data.sampling import ShardSampler, make_loader

    saved = trainer.eval_loader
    accs, counts = [], []
    try:
        for j in range(upto + 1):
            examples = data.task_eval(j)
            counts.append(len(examples))
            if j in known:
                accs.append(float(known[j]))
                continue
            trainer.eval_loader = make_loader(examples, ShardSampler(len(examples), trainer.rank, trainer.world_size),
                                              trainer.tcfg.eval_batch_size, collate, trainer.tcfg.num_workers,
                                              trainer.seed)
            accs.append(float(trainer.evaluate()["eval_accuracy"]))
    finally:
        trainer.eval_loader = saved
    return accs, counts


def _plots(run_dir: Path, result: dict[str, Any], counts: list[int], betas: list[list[float]],
           threshold: float | None) -> None:
    from trainers.reports.continual import plot_accuracy, plot_accuracy_matrix, plot_beta_evolution, plot_beta_heatmap

    plot_accuracy(result["acc_matrix"], counts, run_dir / "accuracy_over_tasks.png")
    plot_accuracy_matrix(result["acc_matrix"], run_dir / "accuracy_matrix.png")
    if betas:
        plot_beta_evolution(betas, run_dir / "beta_evolution.png", threshold)
        plot_beta_heatmap(betas, run_dir / "beta_heatmap.png")


def train_continual(cfg: DictConfig, run_dir: Path, status: dict[str, Any], started_at: float) -> dict[str, Any]:
    """Run every task of a continual dataset into ``run_dir``; returns (and writes) ``metrics.json``."""
    resume = cfg.get("resume")
    if resume not in (None, "auto"):
        raise UserError(f"resume={resume}: a continual run resumes with resume=auto in its own run directory "
                        f"(hydra.run.dir=<the earlier run>)")
    run_dir = Path(run_dir)
    if resume is None and has_results(run_dir):
        raise UserError(f"run directory {run_dir} already holds results; pass resume=auto to continue that run")

    from trainers.data.continual import CONTINUAL_DATASETS

    modality = CONTINUAL_DATASETS[cfg.dataset.name][1]
    if (modality == "text") != (cfg.model.get("modality", "text") == "text"):
        raise UserError(f"dataset {cfg.dataset.name} holds {modality} data but model {cfg.model.name} takes "
                        f"{'images' if modality == 'text' else 'text'}")
    session = Session(cfg, started_at, run_dir)
    try:
        return _train_tasks(session, cfg, run_dir, resume, status, started_at)
    finally:
        session.close_trackers()


def _train_tasks(session: Session, cfg: DictConfig, run_dir: Path, resume: Any, status: dict[str, Any],
                 started_at: float) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from safetensors.torch import load_file, save_file

    from adapters import adapter_state_dict, count_trainable_parameters, load_adapter_state_dict
    from adapters import lora_direction_parameters as direction_parameters
    from trainers.data.continual import build_continual_data
    from trainers.loop import checkpoint as ckpt
    from trainers.reports.continual import summarize

    accelerator, method, seed = session.accelerator, session.method, int(cfg.seed)
    data = build_continual_data(cfg.dataset, cfg.data_root, session.tokenizer)
    model, wrapped = session.build_model(data)
    train_tasks = [data.seen(len(data.tasks) - 1)] if cfg.dataset.joint else data.tasks
    head = HeadMask(model, data.num_labels)
    state = _load_state(run_dir) if resume == "auto" else {"tasks": [], "wall_time_s": 0.0}
    done = len(state["tasks"])
    if resume == "auto":  # before anything is written: a refused resume leaves the run as it was
        _check_resume(run_dir, state, cfg, session.method.task_config(cfg, done))
    log.info("continual %s on %s: %d tasks of %s classes%s, %d modules wrapped, %d tasks already done",
             cfg.adapter.name, cfg.model.name, len(train_tasks), [len(t) for t in train_tasks],
             " (joint)" if cfg.dataset.joint else "", len(wrapped), done)
    status["may_write"] = True
    writer = MetricsWriter(run_dir, enabled=accelerator.is_main_process)
    writer.restart(done)
    if done:  # rebuild the structure of task done-1, then load its state after growth
        for t in range(1, done):
            method.begin_task(model, t)
        final = _task_dir(run_dir, done - 1) / FINAL_ADAPTER
        try:
            load_adapter_state_dict(model, load_file(str(final)))
        except Exception as exc:
            raise UserError(f"cannot resume from {final}: {first_line(exc)}") from None
    segment_start = started_at
    metrics: dict[str, float] = {}
    for t in range(done, len(train_tasks)):
        set_seed(seed + t)
        if t > 0:
            method.begin_task(model, t)
        loss_classes = train_tasks[t] if cfg.dataset.loss_classes == "current" else data.seen(t)
        eval_upto = len(data.tasks) - 1 if cfg.dataset.joint else t
        head.set_classes(loss_classes, data.seen(eval_upto))
        task_data = data.task_data(t) if not cfg.dataset.joint else data.joint().task_data(0)
        task_dir = _task_dir(run_dir, t)
        task_cfg = method.task_config(cfg, t)
        epoch_log = EpochLog(t, int(task_cfg.trainer.epochs), cfg.adapter.get("lambda_sparsity", 0.0))
        trainer = session.trainer(model, task_data, task_dir, session.callbacks([epoch_log], f"task_{t}/"), task_cfg)
        source = ckpt.latest_checkpoint(task_dir) if resume == "auto" else None
        if source is not None:
            trainer.load_checkpoint(source)
        else:
            trainer.start_fresh()
        metrics = trainer.train()
        decision = dict(method.end_task(model, t, cfg, run_dir, accelerator.is_main_process))
        # tested after the growth decision (the model that goes on); the Trainer's own test of task t still holds
        # unless the decision changed the model (adapter t pruned, another temperature, ...)
        unchanged = not cfg.dataset.joint and decision.get("kept", True) and not decision.pop("model_changed", False)
        row, counts = _evaluate_tasks(trainer, data, eval_upto, trainer.collate,
                                      {t: metrics["eval_accuracy"]} if unchanged else {})
        record: dict[str, Any] = {"task": t, "acc_row": row, "eval_counts": counts,
                                  "train_examples": len(task_data.train), "steps": trainer.state.global_step,
                                  "train_time_s": trainer.state.train_time_s,
                                  "eval_loss": metrics["eval_loss"], **decision}
        log.info("after task %d: accuracy on each seen task %s", t, [round(a, 4) for a in row])
        now = time.perf_counter()
        state["wall_time_s"] += now - segment_start
        segment_start = now
        state["tasks"].append(record)  # every process keeps the state; the main one writes it
        state["config"] = ckpt.config_fingerprint(cfg)  # what a resume at this task boundary is checked against
        if accelerator.is_main_process:
            task_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(task_dir / FINAL_ADAPTER) as tmp:
                save_file({k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}, str(tmp))
            writer.log({"step": t, "split": "task", **record})
            session.log_to_trackers({"split": "task", **record}, t)
            draw_run_curves(task_dir)  # the task's own training curves (tasks/task_<t>/curves.png)
            atomic_write_text(run_dir / STATE_FILE, json.dumps(state, indent=1))
        accelerator.wait_for_everyone()

    tasks_done = state["tasks"]
    counts = tasks_done[-1]["eval_counts"]
    result: dict[str, Any] = summarize([r["acc_row"] for r in tasks_done], counts)
    active, total = method.adapters_kept(model)
    last = tasks_done[-1]
    result.update({
        "eval_accuracy": result["acc_final"], "eval_loss": last["eval_loss"],
        "num_tasks": len(data.tasks), "joint": bool(cfg.dataset.joint),
        "active_adapters": active, "total_adapters": total, "active_adapter_ratio": active / total,
        "adapter_params": int(direction_parameters(model)),
        "trainable_params_last_task": int(count_trainable_parameters(model)),
        "train_time_s": sum(r["train_time_s"] for r in tasks_done),
        "wall_time_s": state["wall_time_s"] + time.perf_counter() - segment_start,
        "status": "completed",
    })
    result.update(method.continual_summary(model, tasks_done))
    if accelerator.is_main_process:
        betas = [r["beta_values"] for r in tasks_done if "beta_values" in r]
        _plots(run_dir, result, counts, betas, cfg.adapter.get("growth_threshold") if betas else None)
    session.finish(model, run_dir, result)
    if accelerator.is_main_process:
        log.info("done: Acc %.4f, AAA %.4f, forgetting %.4f, BWT %.4f, active adapters %d/%d, adapter params %d",
                 result["acc_final"], result["aaa"], result["forgetting"], result["bwt"], active, total,
                 result["adapter_params"])
    accelerator.wait_for_everyone()
    return result
