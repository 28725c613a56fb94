"""One run from a composed config: check it, build model/adapter/data/trainer, resume, train, write outputs."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from trainers.config import PRECISIONS, task_config, validate_config
from trainers.errors import UserError, first_line
from trainers.reports import has_results, write_metrics_json

log = logging.getLogger(__name__)


def resume_source(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: start fresh), after checking that ``run_dir`` may be used.

    Raises UserError when ``run_dir`` already holds results and ``resume`` is null, when the checkpoint
    does not exist, or when it was written with a config that would give different results.
    """
    run_dir = Path(run_dir)
    resume = cfg.get("resume")
    if resume is None:
        if has_results(run_dir):
            raise UserError(f"run directory {run_dir} already holds results; pass resume=auto to continue that run "
                            f"or choose another hydra.run.dir")
        return None
    from trainers import checkpoint as ckpt

    if resume == "auto":
        path = ckpt.latest_checkpoint(run_dir)
    else:
        path = ckpt.resolve_resume_path(str(resume))
        if path.resolve().parent.parent != run_dir.resolve() and has_results(run_dir):
            raise UserError(f"run directory {run_dir} already holds results; resume={resume} needs a new run "
                            f"directory (or use resume=auto inside the old one)")
    if path is not None:
        ckpt.check_compatible(path, task_config(cfg))
    return path


def make_accelerator(cfg: DictConfig) -> Any:
    """An Accelerator for the configured precision (devices and DDP come from ``accelerate launch``)."""
    from accelerate import Accelerator

    try:
        accelerator = Accelerator(mixed_precision=PRECISIONS[cfg.trainer.precision])
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"trainer.precision={cfg.trainer.precision} is not available here: "
                        f"{first_line(exc)}") from None
    if cfg.trainer.precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate silently runs fp16 autocast as float32 on a CPU: say so instead of training in fp32
        raise UserError("trainer.precision=fp16 needs a GPU (on a CPU it would silently train in float32); "
                        "use trainer.precision=bf16 or fp32")
    return accelerator


def user_callbacks(cfg: DictConfig) -> list[Any]:
    """Instantiate ``trainer.callbacks`` (name -> {_target_: ..., kwargs})."""
    from hydra.utils import instantiate

    from trainers.callbacks import TrainerCallback

    built = []
    for name, spec in (cfg.trainer.callbacks or {}).items():
        try:
            callback = instantiate(spec)
        except Exception as exc:
            raise UserError(f"cannot build trainer.callbacks.{name}: {first_line(exc)}") from None
        if not isinstance(callback, TrainerCallback):
            raise UserError(f"trainer.callbacks.{name} is a {type(callback).__name__}, not a TrainerCallback")
        built.append(callback)
    return built


def export_adapter(model: Any, run_dir: Path) -> Path:
    """``<run_dir>/adapter/``: the PEFT-format export (or the raw adapter state where PEFT has no format)."""
    from safetensors.torch import save_file

    from adapters import adapter_state_dict, export_peft

    final = Path(run_dir) / "adapter"
    tmp = Path(run_dir) / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_peft(model, tmp)
    except ValueError as exc:  # e.g. Gumbel CL-LoRA has no PEFT format
        log.warning("no PEFT export (%s); writing adapter/adapter_state.safetensors instead", exc)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()},
                  str(tmp / "adapter_state.safetensors"))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def train_run(cfg: DictConfig, run_dir: Path, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one run into ``run_dir`` and return its final metrics (also written to metrics.json).

    ``status["may_write"]`` becomes True once this run owns the folder's results (a fresh folder or a
    successful resume), so a caller knows whether a failure may be recorded there.
    """
    started_at = time.perf_counter()
    status = status if status is not None else {}
    run_dir = Path(run_dir)
    status["may_write"] = not has_results(run_dir)
    cfg = task_config(cfg)
    validate_config(cfg)  # before the heavy imports below, so config errors come back fast
    from trainers.continual_data import is_continual

    if is_continual(cfg.dataset):  # class-incremental: the task loop around the same Trainer
        from trainers.continual import train_continual

        return train_continual(cfg, run_dir, status, started_at)
    source = resume_source(cfg, run_dir)

    from accelerate.utils import set_seed

    from trainers.adapter_hooks import adapter_callbacks
    from trainers.models import load_tokenizer
    from trainers.schedules import build_stages, schedule_callbacks
    from trainers.tasks import build_task
    from trainers.trainer import Trainer

    accelerator = make_accelerator(cfg)
    set_seed(int(cfg.seed))
    tokenizer = load_tokenizer(cfg.model)
    task = build_task(cfg, tokenizer)  # classification or causal LM: data, model, batch scores, evaluation
    data = task.build_data(cfg.dataset, cfg.data_root)
    model, wrapped = task.build_model(cfg.model, cfg.adapter, data)
    if accelerator.is_main_process:
        log.info("%s on %s: %d modules wrapped, %s, %d process(es) on %s", cfg.adapter.name, cfg.model.name,
                 len(wrapped), task.describe(data), accelerator.num_processes, accelerator.device)
    if cfg.sparse_lambda > 0 and not any(n.endswith(".gate") for n, _ in model.named_parameters()):
        log.warning("sparse_lambda=%s has no effect: adapter %s has no gates", cfg.sparse_lambda, cfg.adapter.name)
    callbacks = adapter_callbacks(cfg.adapter) + schedule_callbacks(cfg) + user_callbacks(cfg)
    trainer = Trainer(cfg, model, data, task.collator(), accelerator, run_dir, build_stages(cfg), callbacks,
                      started_at, task=task)
    if source is not None:
        from_other_run = source.resolve().parent.parent != run_dir.resolve()
        trainer.load_checkpoint(source, source.parent.parent if from_other_run else None)
    else:
        trainer.start_fresh()
    status["may_write"] = True
    metrics = trainer.train()
    result = trainer.final_metrics(metrics)
    for callback in trainer.callbacks:
        callback.on_run_end(trainer, result)
    if accelerator.is_main_process:
        export_adapter(model, run_dir)
        write_metrics_json(run_dir, result)
        log.info("done: %s", ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in result.items()))
    accelerator.wait_for_everyone()
    return result


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


def run_job(cfg: DictConfig) -> float:
    """The Hydra task: train into Hydra's output folder; return eval_accuracy for sweepers.

    In a multirun a failing job writes status failed and returns NaN so the sweep goes on; a single
    run re-raises (the CLI prints one line and exits non-zero).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    status: dict[str, Any] = {}
    try:
        result = float(train_run(cfg, run_dir, status)["eval_accuracy"])
    except Exception as exc:
        record_failure(run_dir, exc, status)
        from trainers.cli import format_error, report_failure

        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("job %s failed: %s", hydra_cfg.job.num, format_error(exc))
            return float("nan")
        if report_failure(exc):  # the CLI prints it as one line and exits 1
            log.debug("run failed", exc_info=exc)
            return float("nan")
        raise
    finally:
        if hydra_cfg.mode == RunMode.MULTIRUN:  # a resumed sweep job: keep or restore the earlier .hydra/ files
            from trainers.hydra_callbacks import settle_hydra_files

            settle_hydra_files(run_dir, keep_new=bool(status.get("may_write")))
    return result
