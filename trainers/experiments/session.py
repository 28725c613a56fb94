"""What every run does around the training loop, once: config, method and schedule plug-ins, accelerator, seed,
objective, model, callbacks, resume checks, the end-of-run export and ``metrics.json``.

The single run (:mod:`trainers.experiments.single`) uses one :class:`Session` for one Trainer; the
continual runner (:mod:`trainers.experiments.continual`) uses one Session for a Trainer per task.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from trainers.core.config import without_hydra
from trainers.core.errors import UserError, first_line
from trainers.loop.hooks import TrainerCallback
from trainers.loop.metrics_log import has_results, write_metrics_json
from trainers.methods import get_method
from trainers.methods.schedules import get_schedule

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


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
    from trainers.loop import checkpoint as ckpt

    if resume == "auto":
        path = ckpt.latest_checkpoint(run_dir)
    else:
        path = ckpt.resolve_resume_path(str(resume))
        if path.resolve().parent.parent != run_dir.resolve() and has_results(run_dir):
            raise UserError(f"run directory {run_dir} already holds results; resume={resume} needs a new run "
                            f"directory (or use resume=auto inside the old one)")
    if path is not None:
        ckpt.check_compatible(path, without_hydra(cfg))
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


def user_callbacks(cfg: DictConfig) -> list[TrainerCallback]:
    """Instantiate ``trainer.callbacks`` (name -> {_target_: ..., kwargs}).

    The target is imported and checked to be a TrainerCallback subclass before it is called, so a config
    cannot make the run call an arbitrary function."""
    from hydra.utils import get_class, instantiate

    built = []
    for name, spec in (cfg.trainer.callbacks or {}).items():
        target = spec.get("_target_") if isinstance(spec, DictConfig) else None
        if not isinstance(target, str):
            raise UserError(f"trainer.callbacks.{name} needs a _target_: the dotted path of a TrainerCallback class")
        try:
            cls = get_class(target)
        except Exception as exc:
            raise UserError(f"trainer.callbacks.{name}: {target} is not a class ({first_line(exc)})") from None
        if not issubclass(cls, TrainerCallback):
            raise UserError(f"trainer.callbacks.{name}: {target} is not a trainers.loop.hooks.TrainerCallback "
                            f"subclass")
        try:
            callback = instantiate(spec)
        except Exception as exc:
            raise UserError(f"cannot build trainer.callbacks.{name}: {first_line(exc)}") from None
        if not isinstance(callback, TrainerCallback):
            raise UserError(f"trainer.callbacks.{name} is a {type(callback).__name__}, not a TrainerCallback")
        built.append(callback)
    return built


def grad_components(method: Any, cfg: DictConfig) -> dict[str, str]:
    """component -> regex on parameter names: the method's (``lora_A``, ``lora_B``, ...) and ``head`` (the
    modules in ``model.modules_to_save``, trained in full)."""
    import re

    components = dict(method.grad_components(cfg))
    saved = [re.escape(str(name)) for name in cfg.model.get("modules_to_save") or []]
    if saved:
        components["head"] = rf"(^|\.)({'|'.join(saved)})\."
    return components


class Session:
    """One run's setup. Creating it builds the accelerator, seeds every RNG with ``cfg.seed`` and loads the
    tokenizer (text models) and the objective; :meth:`build_model` and :meth:`trainer` then give the parts."""

    def __init__(self, cfg: DictConfig, started_at: float | None = None) -> None:
        from accelerate.utils import set_seed

        from trainers.models.loading import load_tokenizer
        from trainers.objectives import build_objective

        self.cfg = cfg
        self.started_at = started_at if started_at is not None else time.perf_counter()
        self.method = get_method(cfg.adapter.name)
        self.schedule = get_schedule(cfg.schedule.name)
        self.accelerator = make_accelerator(cfg)
        set_seed(int(cfg.seed))
        self.text = cfg.model.get("modality", "text") == "text"
        self.tokenizer = load_tokenizer(cfg.model) if self.text else None
        self.objective = build_objective(cfg, self.tokenizer)
        if self.is_main:
            for warning in self.method.warnings(cfg):
                log.warning(warning)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def build_model(self, data: Any) -> tuple[Any, list[str]]:
        """The model with the method's adapter injected, and the wrapped module names."""
        return self.objective.build_model(self.cfg.model, self.method.adapter_spec(self.cfg.adapter), data)

    def callbacks(self, extra: list[TrainerCallback] | None = None) -> list[TrainerCallback]:
        """The method's, the schedule's and the user's callbacks (in that order), then ``extra``; with
        ``trainer.log_grad_norms`` also the per-component gradient norms."""
        hooks = self.method.callbacks(self.cfg) + self.schedule.callbacks(self.cfg) + user_callbacks(self.cfg)
        if self.cfg.trainer.get("log_grad_norms"):
            from trainers.loop.grad_norms import GradNormsByComponent

            hooks.append(GradNormsByComponent(grad_components(self.method, self.cfg)))
        return hooks + list(extra or [])

    def trainer(self, model: Any, data: Any, run_dir: Path, callbacks: list[TrainerCallback],
                cfg: DictConfig | None = None) -> Any:
        """A Trainer for ``model`` on ``data`` writing into ``run_dir`` (with ``cfg``, e.g. one task's config of a
        continual run; default: the session's)."""
        from trainers.loop.trainer import Trainer

        cfg = self.cfg if cfg is None else cfg
        return Trainer(cfg, model, data, self.objective.collator(), self.accelerator, run_dir,
                       self.schedule.stages(cfg), lambda m: self.method.optimizers(m, cfg), self.objective,
                       callbacks, self.started_at)

    def finish(self, model: Any, run_dir: Path, result: dict[str, Any]) -> None:
        """Export the adapter and write ``metrics.json`` (main process), then wait for every process."""
        from trainers.experiments.export import export_adapter

        if self.is_main:
            export_adapter(model, run_dir)
            write_metrics_json(run_dir, result)
        self.accelerator.wait_for_everyone()
