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


def make_accelerator(cfg: DictConfig, run_dir: Path | None = None) -> Any:
    """An Accelerator for the configured precision (devices and DDP come from ``accelerate launch``), with the
    ``logger`` group's tracker as ``log_with`` and ``run_dir`` as its project folder (when both are set)."""
    from accelerate import Accelerator

    kwargs: dict[str, Any] = {}
    logger = cfg.get("logger")
    if run_dir is not None and logger is not None and logger.name != "none":
        from trainers.loop.trackers import CSVTracker, log_with

        tracker = log_with(str(logger.name))
        if isinstance(tracker, CSVTracker):
            tracker.configure(run_dir, str(logger.project))
        kwargs = {"log_with": tracker, "project_dir": str(run_dir)}
    try:
        accelerator = Accelerator(mixed_precision=PRECISIONS[cfg.trainer.precision], **kwargs)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"trainer.precision={cfg.trainer.precision} is not available here: "
                        f"{first_line(exc)}") from None
    if cfg.trainer.precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate silently runs fp16 autocast as float32 on a CPU: say so instead of training in fp32
        raise UserError("trainer.precision=fp16 needs a GPU (on a CPU it would silently train in float32); "
                        "use trainer.precision=bf16 or fp32")
    return accelerator


def sweep_job() -> tuple[str, str] | None:
    """(sweep folder name, job number) inside a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        hydra_cfg = HydraConfig.get()
        return Path(hydra_cfg.sweep.dir).name, str(hydra_cfg.job.num)
    except Exception:  # no Hydra context (the Python API)
        return None


def tracker_init_kwargs(cfg: DictConfig, run_dir: Path) -> dict[str, dict[str, Any]]:
    """accelerate's ``init_kwargs`` for the configured tracker: a run name (and, in a sweep, a group) from the run
    folder, then the user's ``logger.init_kwargs`` (which win)."""
    from omegaconf import OmegaConf

    name = str(cfg.logger.name)
    sweep = sweep_job()
    run_name = f"{sweep[0]}-{sweep[1]}" if sweep else Path(run_dir).name
    defaults: dict[str, Any] = {}
    if name == "wandb":
        defaults = {"dir": str(run_dir), "name": run_name, **({"group": sweep[0]} if sweep else {})}
    elif name == "mlflow":
        defaults = {"run_name": run_name, **({"tags": {"sweep": sweep[0]}} if sweep else {})}
    user = OmegaConf.to_container(cfg.logger.init_kwargs, resolve=True) or {}
    return {name: {**defaults, **user}}  # type: ignore[dict-item]


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

    def __init__(self, cfg: DictConfig, started_at: float | None = None, run_dir: Path | None = None) -> None:
        from accelerate.utils import set_seed

        from trainers.models.loading import load_tokenizer
        from trainers.objectives import build_objective

        self.cfg = cfg
        self.started_at = started_at if started_at is not None else time.perf_counter()
        self.method = get_method(cfg.adapter.name)
        self.schedule = get_schedule(cfg.schedule.name)
        self.accelerator = make_accelerator(cfg, run_dir)
        self.tracking = bool(self.accelerator.log_with)
        if self.tracking:
            from omegaconf import OmegaConf

            from trainers.loop.trackers import flat_hparams

            config = OmegaConf.to_container(cfg, resolve=True)
            assert isinstance(config, dict) and run_dir is not None
            try:
                self.accelerator.init_trackers(str(cfg.logger.project), config=flat_hparams(config),
                                               init_kwargs=tracker_init_kwargs(cfg, Path(run_dir)))
            except Exception as exc:  # e.g. no tracking server, a refused store, bad logger.init_kwargs
                raise UserError(f"logger={cfg.logger.name} could not start: {first_line(exc)}") from None
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
        """The model with the method's adapter injected (its config naming the data's labels, when the data has
        label names), and the wrapped module names."""
        from trainers.experiments.export import set_label_names

        model, wrapped = self.objective.build_model(self.cfg.model, self.method.adapter_spec(self.cfg.adapter), data)
        set_label_names(model, getattr(data, "label_names", None))
        return model, wrapped

    def callbacks(self, extra: list[TrainerCallback] | None = None,
                  tracker_prefix: str = "") -> list[TrainerCallback]:
        """The method's, the schedule's and the user's callbacks (in that order), then ``extra``; with
        ``trainer.log_grad_norms`` also the per-component gradient norms; with a ``logger``, last, the one that
        sends metrics.jsonl records to the tracker, keys prefixed by ``tracker_prefix``."""
        hooks = self.method.callbacks(self.cfg) + self.schedule.callbacks(self.cfg) + user_callbacks(self.cfg)
        if self.cfg.trainer.get("log_grad_norms"):
            from trainers.loop.grad_norms import GradNormsByComponent

            hooks.append(GradNormsByComponent(grad_components(self.method, self.cfg)))
        built = hooks + list(extra or [])
        if self.tracking:
            from trainers.loop.trackers import TrackerLog

            built.append(TrackerLog(tracker_prefix))
        return built

    def log_to_trackers(self, values: dict[str, Any], step: int) -> None:
        """Send ``values`` (numbers only) to the tracker at ``step``; a no-op without one."""
        if self.tracking:
            from trainers.loop.trackers import tracker_values

            self.accelerator.log(tracker_values(values), step=step)

    def close_trackers(self) -> None:
        """Finish the tracker runs (flushes their files); safe to call twice. Not ``end_training``, which would
        also end the process group."""
        if self.tracking and self.is_main:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.tracking = False

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
        """Export the adapter (and with ``trainer.save_merged`` the merged model, unless the method's end-of-run
        step wrote it) and write ``metrics.json`` (main process), then wait for every process."""
        from trainers.experiments.export import MERGED_DIR, export_adapter, export_merged, model_card

        if self.is_main:
            export_adapter(model, run_dir, self.cfg, self.tokenizer, result)
            if self.cfg.trainer.get("save_merged", False):
                merged = Path(run_dir) / MERGED_DIR
                if (merged / "config.json").is_file():  # written by the method (SoRA: after pruning, checked)
                    from adapters import peft_task_type

                    card = model_card(self.cfg, Path(run_dir), result, peft_task_type(model), merged=True)
                    (merged / "README.md").write_text(card, encoding="utf-8")
                else:
                    export_merged(model, run_dir, self.cfg, self.tokenizer, result)
            write_metrics_json(run_dir, result)
        step = int(result.get("global_step") or result.get("num_tasks") or 0)
        self.log_to_trackers({"split": "final", **result}, step)
        self.close_trackers()
        self.accelerator.wait_for_everyone()
