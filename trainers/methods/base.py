"""The method plug-in interface: everything one fine-tuning method adds to a run lives in its plug-in.

A plug-in owns its config schema (with checks), the keyword arguments it passes to
``adapters.wrap_linears``, its optimizers (parameter groups), its callbacks (extra losses, per-step
updates, evaluation metrics, stage parameters, the end-of-run step) and, for continual runs, what
happens between tasks. ``trainers.methods.get_method(adapter.name)`` finds it; the loop never names one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn

from adapters import DROPOUT_SHARING
from trainers.core.errors import UserError
from trainers.loop.hooks import TrainerCallback
from trainers.loop.optimizers import OptimizerSpec, build_adamw
from trainers.models.loading import AdapterSpec

log = logging.getLogger(__name__)


@dataclass
class LoraSchema:
    """Keys every LoRA-family adapter config has (``conf/adapter/*.yaml``)."""

    name: str = MISSING
    r: int = MISSING
    lora_alpha: float = MISSING
    lora_dropout: float = MISSING
    target_modules: Any = MISSING
    use_rslora: bool = False
    dropout_sharing: str = "shared"


# the LoRA factors (``lora_A``, ``lora_B``, also ``lora_A.0`` inside a per-task ParameterList)
LORA_COMPONENTS = {"lora_A": r"(^|\.)lora_A(\.\d+)?$", "lora_B": r"(^|\.)lora_B(\.\d+)?$"}


def require(ok: bool, message: str) -> None:
    """Raise a one-line UserError unless ``ok``."""
    if not ok:
        raise UserError(message)


def adamw(lr: float, betas: Any, weight_decay: float, impl: str = "auto") -> Any:
    """A builder of ``torch.optim.AdamW`` for :class:`OptimizerSpec`, run as ``impl`` (``trainer.optimizer_impl``,
    see :func:`~trainers.loop.optimizers.build_adamw`)."""
    betas = (float(betas[0]), float(betas[1]))
    return lambda groups: build_adamw(groups, str(impl), lr=float(lr), betas=betas, weight_decay=float(weight_decay))


class Method:
    """LoRA-family defaults; a plug-in subclasses this and overrides what its method changes.

    Class attributes: ``name`` (``adapter.name``), ``layer`` (the ``adapters`` layer kind it injects),
    ``schema`` (its config dataclass), ``layer_keys`` (adapter config key -> ``wrap_linears`` keyword),
    ``stage_params`` (the :class:`~trainers.loop.stages.Stage` params it understands).
    """

    name: ClassVar[str] = ""
    layer: ClassVar[str] = ""
    schema: ClassVar[type] = LoraSchema
    layer_keys: ClassVar[dict[str, str]] = {"use_rslora": "use_rslora"}
    stage_params: ClassVar[tuple[str, ...]] = ()

    # -- config ------------------------------------------------------------------------------------
    def check(self, cfg: DictConfig) -> None:
        """Check the method's own values (the schema has already checked keys and types)."""
        adapter = cfg.adapter
        require(adapter.r > 0, f"adapter.r must be > 0 (got {adapter.r})")
        require(0.0 <= adapter.lora_dropout < 1.0,
                f"adapter.lora_dropout must be in [0, 1) (got {adapter.lora_dropout})")
        sharing = adapter.get("dropout_sharing", "shared")
        require(sharing in DROPOUT_SHARING,
                f"adapter.dropout_sharing must be one of {', '.join(DROPOUT_SHARING)} (got {sharing})")
        targets = adapter.target_modules
        require(isinstance(targets, str) or (OmegaConf.is_list(targets) and len(targets) > 0
                                             and all(isinstance(t, str) for t in targets)),
                f"adapter.target_modules must be a string or a non-empty list of strings (got {targets})")

    def warnings(self, cfg: DictConfig) -> list[str]:
        """Things worth a log line at the start of a run (settings that do nothing for this method)."""
        if float(cfg.get("sparse_lambda", 0.0)) > 0 and "sparse_lambda" not in self.stage_params:
            return [f"sparse_lambda={cfg.sparse_lambda} has no effect: adapter {self.name} has no gates"]
        return []

    # -- model ---------------------------------------------------------------------------------------
    def adapter_spec(self, adapter_cfg: DictConfig) -> AdapterSpec:
        """What ``wrap_linears`` is called with."""
        targets = adapter_cfg.target_modules
        targets = list(targets) if OmegaConf.is_list(targets) else targets
        kwargs = {dst: adapter_cfg[src] for src, dst in self.layer_keys.items() if src in adapter_cfg}
        if "dropout_sharing" in adapter_cfg:  # every LoRA-family method: how the layers draw their dropout masks
            kwargs["dropout_sharing"] = str(adapter_cfg.dropout_sharing)
        return AdapterSpec(self.name, self.layer or self.name, int(adapter_cfg.r), float(adapter_cfg.lora_alpha),
                           float(adapter_cfg.lora_dropout), targets, kwargs)

    # -- training ------------------------------------------------------------------------------------
    def optimizers(self, model: nn.Module, cfg: DictConfig) -> list[OptimizerSpec]:
        """One AdamW (``base``) over every trainable parameter, warmup ``trainer.warmup_ratio``."""
        tcfg = cfg.trainer
        params = [p for p in model.parameters() if p.requires_grad]
        build = adamw(tcfg.base_lr, tcfg.betas, tcfg.weight_decay, tcfg.optimizer_impl)
        return [OptimizerSpec("base", [{"params": params}], build, float(tcfg.warmup_ratio))]

    def callbacks(self, cfg: DictConfig) -> list[TrainerCallback]:
        """The training hooks this method needs (none for plain LoRA)."""
        return []

    def grad_components(self, cfg: DictConfig) -> dict[str, str]:
        """component -> regex on parameter names, for ``trainer.log_grad_norms`` (``grad_norm_<component>``)."""
        return dict(LORA_COMPONENTS)

    # -- continual learning --------------------------------------------------------------------------
    def task_config(self, cfg: DictConfig, task: int) -> DictConfig:
        """The config task ``task`` of a continual run trains with (e.g. other epochs for the first task);
        default: ``cfg`` itself."""
        return cfg

    def begin_task(self, model: nn.Module, task: int) -> None:
        """Before training task ``task`` of a continual run (task > 0); default: keep training the same weights."""

    def end_task(self, model: nn.Module, task: int, cfg: DictConfig, run_dir: Path, main: bool) -> dict[str, Any]:
        """After training task ``task``: e.g. decide which adapters to keep; returns what goes into the task record
        (the key ``model_changed``, popped by the runner: the model differs from the one the Trainer tested last)."""
        return {}

    def adapters_kept(self, model: nn.Module) -> tuple[int, int]:
        """``(kept, total)`` task adapters of a continual run (one shared adapter by default)."""
        return 1, 1

    def continual_summary(self, model: nn.Module, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        """Extra keys for a continual run's metrics.json."""
        return {}
