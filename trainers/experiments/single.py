"""One run from a composed config: check it, set up a Session, resume or start, train, write the outputs."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from trainers.core.config import without_hydra
from trainers.experiments.session import Session, resume_source
from trainers.loop.metrics_log import has_results

log = logging.getLogger(__name__)


def adapter_parameter_count(model: Any, modules_to_save: list[str]) -> int:
    """Trainable parameters outside the fully trained ``modules_to_save`` (the task head): the adapter's size."""
    def saved(name: str) -> bool:
        return any(f".{m}." in f".{name}" or name.startswith(f"{m}.") for m in modules_to_save)

    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and not saved(name))


def analysis_callbacks(cfg: DictConfig) -> list[Any]:
    """The weight-decomposition analysis (``analysis.*``), when on."""
    analysis = cfg.get("analysis") or {}
    if not analysis.get("weight_decomposition", False):
        return []
    from trainers.reports.weight_decomposition import WeightDecompositionAnalysis

    return [WeightDecompositionAnalysis(cfg.adapter.name, int(analysis.get("every_steps", 0)))]


def train_run(cfg: DictConfig, run_dir: Path, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one run into ``run_dir`` and return its final metrics (also written to metrics.json).

    ``cfg`` must already be checked (``trainers.cli.schemas.validate_config``; the CLI does it first).

    ``status["may_write"]`` becomes True once this run owns the folder's results (a fresh folder or a
    successful resume), so a caller knows whether a failure may be recorded there.
    """
    started_at = time.perf_counter()
    status = status if status is not None else {}
    run_dir = Path(run_dir)
    status["may_write"] = not has_results(run_dir)
    cfg = without_hydra(cfg)
    from trainers.data.continual import is_continual

    if is_continual(cfg.dataset):  # class-incremental: the task loop around the same Trainer
        from trainers.experiments.continual import train_continual

        return train_continual(cfg, run_dir, status, started_at)
    source = resume_source(cfg, run_dir)

    session = Session(cfg, started_at, run_dir)
    try:
        return _train(session, cfg, run_dir, source, status)
    finally:
        session.close_trackers()


def _train(session: Session, cfg: DictConfig, run_dir: Path, source: Path | None,
           status: dict[str, Any]) -> dict[str, Any]:
    objective = session.objective
    data = objective.build_data(cfg.dataset, cfg.data_root)
    model, wrapped = session.build_model(data)
    if session.is_main:
        log.info("%s on %s: %d modules wrapped, %s, %d process(es) on %s", cfg.adapter.name, cfg.model.name,
                 len(wrapped), objective.describe(data), session.accelerator.num_processes, session.accelerator.device)
    trainer = session.trainer(model, data, run_dir, session.callbacks(analysis_callbacks(cfg)))
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
    result.setdefault("adapter_params", adapter_parameter_count(model, list(cfg.model.modules_to_save or [])))
    session.finish(model, run_dir, result)
    if session.is_main:
        from trainers.reports.curves import draw_run_curves

        draw_run_curves(run_dir)
        log.info("done: %s", ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in result.items()))
    return result
