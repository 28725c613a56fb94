"""Config schemas and checks: every key of every config group is declared, so a typo is an error.

The YAML files under ``conf/`` hold the defaults and the documentation; the dataclasses only declare
which keys exist and their types (all ``MISSING``, so a key missing from a YAML file is an error too).
The ``adapter`` and ``schedule`` groups are declared and checked by their plug-ins
(``trainers.methods``); the other groups are declared here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainers.core.config import without_hydra
from trainers.core.errors import UserError
from trainers.loop.nonfinite import POLICIES as NONFINITE_POLICIES
from trainers.loop.optimizers import OPTIMIZER_IMPLS


# --------------------------------------------------------------------------------------------- schemas
@dataclass
class ModelSchema:
    name: str = MISSING
    pretrained: str | None = MISSING
    tokenizer: str | None = MISSING
    config: dict[str, Any] | None = MISSING
    modules_to_save: list[str] = MISSING
    modality: str = "text"
    gguf_file: str | None = None  # a GGUF file inside pretrained / tokenizer (transformers dequantises it)
    embedding_targets: list[str] = field(default_factory=list)  # nn.Embedding modules given an Embedding LoRA
    hub_id: str | None = None  # the base model's portable id in exports (base_model_name_or_path, model card)
    fast_dropout: bool = True  # the model's own nn.Dropout modules draw masks with adapters.dropout's generator


@dataclass
class DatasetSchema:
    name: str = MISSING
    max_train_samples: int | None = MISSING
    max_eval_samples: int | None = MISSING
    max_seq_length: int = MISSING
    task: str = "classification"


@dataclass
class CausalLMDatasetSchema(DatasetSchema):
    eval_size: int = MISSING
    split_seed: int = MISSING
    separator: str = MISSING
    generate_samples: int = MISSING
    max_new_tokens: int = MISSING
    show_samples: int = MISSING


@dataclass
class ContinualDatasetSchema(DatasetSchema):
    """Class-incremental datasets (trainers/continual_data.py): the classes are cut into tasks."""

    num_tasks: int | None = MISSING
    classes_per_task: int = MISSING
    order_seed: int | None = MISSING
    max_train_per_class: int | None = MISSING
    max_eval_per_class: int | None = MISSING
    loss_classes: str = MISSING
    joint: bool = MISSING


@dataclass
class TrainerSchema:
    epochs: int = MISSING
    max_steps: int | None = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    group_by_length: bool = MISSING
    base_lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    warmup_ratio: float = MISSING
    lr_scheduler: str = "linear"
    lr_scheduler_kwargs: dict[str, Any] | None = None
    max_grad_norm: float = MISSING
    grad_accum_steps: int = MISSING
    precision: str = MISSING
    log_every_steps: int = MISSING
    eval_every_steps: int = MISSING
    save_every_steps: int = MISSING
    keep_last_checkpoints: int = MISSING
    num_workers: int = MISSING
    save_merged: bool = MISSING
    callbacks: dict[str, Any] | None = None
    eval_at_start: bool = False
    eval_every_epochs: int = 0  # evaluate after every N epochs; 0 = off
    metric_for_best: str = "eval_score"  # compares evaluations (greater is better unless the name holds "loss")
    load_best_at_end: bool = False  # final metrics and exported adapter from the best evaluation
    early_stopping_patience: int = 0  # stop after N evaluations without improvement; 0 = off
    log_grad_norms: bool = False
    on_nonfinite: str = "stop"  # stop | skip_step (trainers/loop/nonfinite.py)
    max_skipped_steps: int = 3  # skip_step: steps that may be skipped in a run before it stops
    optimizer_impl: str = "auto"  # auto | fused | foreach | for_loop (trainers/loop/optimizers.py)
    compile: bool = False  # torch.compile the training forward/backward


@dataclass
class AnalysisSchema:
    weight_decomposition: bool = MISSING
    every_steps: int = MISSING


@dataclass
class LoggerSchema:
    """The ``logger`` group: an experiment tracker through accelerate (trainers/loop/trackers.py)."""

    name: str = MISSING
    project: str = MISSING
    init_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RootSchema:
    seed: int = MISSING
    sparse_lambda: float = MISSING
    data_root: str | None = MISSING
    resume: str | None = MISSING
    adapter: Any = MISSING
    model: Any = MISSING
    dataset: Any = MISSING
    schedule: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    analysis: Any = MISSING


@dataclass
class OwnDataSchema(DatasetSchema):
    """Columns and task of ``dataset=files`` / ``dataset=hub`` (trainers/data/files.py)."""

    text_column: str = MISSING
    text_pair_column: str | None = MISSING
    label_column: str = MISSING
    problem_type: str = MISSING
    metric: str | None = MISSING


@dataclass
class FilesDatasetSchema(OwnDataSchema):
    train_file: str | None = MISSING
    eval_file: str | None = MISSING


@dataclass
class HubDatasetSchema(OwnDataSchema):
    path: str | None = MISSING
    config_name: str | None = MISSING
    train_split: str = MISSING
    eval_split: str = MISSING


# datasets whose keys differ from DatasetSchema (by dataset.name)
DATASET_SCHEMAS: dict[str, type] = {"files": FilesDatasetSchema, "hub": HubDatasetSchema,
                                    "english_quotes": CausalLMDatasetSchema,
                                    **{name: ContinualDatasetSchema
                                       for name in ("clinc150_cl", "banking77_cl", "cifar100_cl", "mnist_cl")}}
PRECISIONS = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
TRACKERS = ("none", "csv", "tensorboard", "wandb", "mlflow")  # logger.name (packages: trainers/loop/trackers.py)


# --------------------------------------------------------------------------------------------- checks
def _check_keys(node: Any, schema: type, where: str) -> DictConfig:
    """Merge ``node`` into ``schema``: unknown keys, wrong types and missing keys become UserErrors."""
    if not isinstance(node, DictConfig):
        raise UserError(f"'{where}' must be a config group, got {node!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        first = str(exc).splitlines()[0]
        full = f"{where}.{key}" if where != "config" else str(key)
        if "not in" in first or "no attribute" in first.lower():
            raise UserError(f"unknown config key '{full}' (valid keys: "
                            f"{', '.join(f.name for f in fields(schema))})") from None
        raise UserError(f"bad value for '{full}': {first}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise UserError(f"config '{where}' lacks required key(s): {', '.join(f'{where}.{m}' for m in missing)}")
    return merged


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate_config(cfg: DictConfig) -> None:
    """Check every key and value of a composed config; raise UserError with one line on the first problem."""
    from trainers.methods import get_method
    from trainers.methods.schedules import get_schedule

    _check_keys(without_hydra(cfg), RootSchema, "config")

    adapter_name = cfg.adapter.get("name") if isinstance(cfg.adapter, DictConfig) else None
    method = get_method(adapter_name)
    adapter = _check_keys(cfg.adapter, method.schema, "adapter")
    model = _check_keys(cfg.model, ModelSchema, "model")
    _require(model.modality in ("text", "image"), f"model.modality must be text or image (got {model.modality!r})")
    dataset_name = cfg.dataset.get("name") if isinstance(cfg.dataset, DictConfig) else None
    dataset = _check_keys(cfg.dataset, DATASET_SCHEMAS.get(dataset_name, DatasetSchema), "dataset")
    schedule_name = cfg.schedule.get("name") if isinstance(cfg.schedule, DictConfig) else None
    schedule = get_schedule(schedule_name)
    schedule_cfg = _check_keys(cfg.schedule, schedule.schema, "schedule")
    trainer = _check_keys(cfg.trainer, TrainerSchema, "trainer")
    logger = _check_keys(cfg.logger, LoggerSchema, "logger")
    _require(logger.name in TRACKERS, f"logger.name must be one of {', '.join(TRACKERS)} (got {logger.name!r})")
    _require(bool(logger.project.strip()), "logger.project must not be empty")
    analysis = _check_keys(cfg.analysis, AnalysisSchema, "analysis")
    _require(analysis.every_steps >= 0, f"analysis.every_steps must be >= 0 (got {analysis.every_steps})")
    checked = OmegaConf.merge(cfg, {"adapter": adapter, "schedule": schedule_cfg})

    _check_finite(checked)
    _require(cfg.sparse_lambda >= 0, f"sparse_lambda must be >= 0 (got {cfg.sparse_lambda})")
    method.check(checked)
    schedule.check(checked, method.stage_params)
    for key in ("max_train_samples", "max_eval_samples"):
        value = dataset[key]
        _require(value is None or value > 0, f"dataset.{key} must be null or > 0 (got {value})")
    _require(dataset.max_seq_length > 0, f"dataset.max_seq_length must be > 0 (got {dataset.max_seq_length})")
    if DATASET_SCHEMAS.get(dataset_name) is ContinualDatasetSchema:
        from trainers.data.continual import check_continual_config

        check_continual_config(dataset)
    _require(dataset.task in ("classification", "causal_lm"),
             f"dataset.task must be classification or causal_lm (got {dataset.task!r})")
    if dataset.task == "causal_lm":
        _check_causal_lm(dataset)
    if dataset_name in ("files", "hub"):
        _check_own_data(dataset)

    _require(trainer.epochs > 0 or (trainer.max_steps or 0) > 0,
             "trainer.epochs or trainer.max_steps must be > 0")
    _require(trainer.max_steps is None or trainer.max_steps > 0,
             f"trainer.max_steps must be null or > 0 (got {trainer.max_steps})")
    for key in ("batch_size", "eval_batch_size", "grad_accum_steps", "log_every_steps", "keep_last_checkpoints"):
        _require(trainer[key] > 0, f"trainer.{key} must be > 0 (got {trainer[key]})")
    for key in ("eval_every_steps", "eval_every_epochs", "early_stopping_patience", "save_every_steps", "num_workers",
                "weight_decay", "max_grad_norm"):
        _require(trainer[key] >= 0, f"trainer.{key} must be >= 0 (got {trainer[key]})")
    _check_best(trainer, DATASET_SCHEMAS.get(dataset_name) is ContinualDatasetSchema)
    _require(trainer.base_lr > 0, f"trainer.base_lr must be > 0 (got {trainer.base_lr})")
    _require(len(trainer.betas) == 2 and all(0 <= b < 1 for b in trainer.betas),
             f"trainer.betas must be two numbers in [0, 1) (got {list(trainer.betas)})")
    _require(0 <= trainer.warmup_ratio <= 1, f"trainer.warmup_ratio must be in [0, 1] (got {trainer.warmup_ratio})")
    from trainers.loop.optimizers import check_scheduler

    kwargs = OmegaConf.to_container(trainer.lr_scheduler_kwargs) if trainer.lr_scheduler_kwargs else None
    problem = check_scheduler(trainer.lr_scheduler, kwargs)  # type: ignore[arg-type]
    _require(problem is None, f"trainer.lr_scheduler {problem}")
    _require(trainer.on_nonfinite in NONFINITE_POLICIES, f"trainer.on_nonfinite must be one of "
             f"{', '.join(NONFINITE_POLICIES)} (got {trainer.on_nonfinite!r})")
    _require(trainer.max_skipped_steps >= 0,
             f"trainer.max_skipped_steps must be >= 0 (got {trainer.max_skipped_steps})")
    _require(trainer.optimizer_impl in OPTIMIZER_IMPLS, f"trainer.optimizer_impl must be one of "
             f"{', '.join(OPTIMIZER_IMPLS)} (got {trainer.optimizer_impl!r})")
    _require(trainer.precision in PRECISIONS,
             f"trainer.precision must be one of {', '.join(PRECISIONS)} (got {trainer.precision!r})")
    resume = cfg.resume
    _require(resume is None or isinstance(resume, str), f"resume must be null, auto or a path (got {resume!r})")


def _check_best(trainer: DictConfig, continual: bool) -> None:
    """Best-checkpoint selection and early stopping: single runs only; early stopping needs periodic evaluation."""
    selecting = trainer.load_best_at_end or trainer.early_stopping_patience > 0
    _require(not (selecting and continual), "trainer.load_best_at_end and trainer.early_stopping_patience work on "
                                            "single runs, not on continual datasets")
    _require(trainer.early_stopping_patience == 0 or trainer.eval_every_steps > 0 or trainer.eval_every_epochs > 0,
             "trainer.early_stopping_patience needs periodic evaluation: set trainer.eval_every_steps or "
             "trainer.eval_every_epochs")
    _require(bool(trainer.metric_for_best), "trainer.metric_for_best must name an evaluation metric (e.g. eval_score)")


def _check_own_data(dataset: DictConfig) -> None:
    from trainers.objectives.metrics import FAMILIES

    _require(dataset.problem_type in ("classification", "regression"),
             f"dataset.problem_type must be classification or regression (got {dataset.problem_type!r})")
    _require(dataset.metric is None or dataset.metric in FAMILIES,
             f"dataset.metric must be null or one of {', '.join(FAMILIES)} (got {dataset.metric!r})")
    _require(dataset.task == "classification", "dataset=files / dataset=hub train a classifier or regressor "
                                               "(dataset.task must be classification)")
    required = ("train_file", "eval_file") if dataset.name == "files" else ("path",)
    for key in required:
        _require(bool(dataset[key]), f"dataset={dataset.name} needs dataset.{key}")


def _check_finite(cfg: DictConfig) -> None:
    """Every number of the config (except user callbacks' arguments) must be finite: inf / nan are refused."""
    from trainers.loop.checkpoint import config_fingerprint

    for key, value in config_fingerprint(without_hydra(cfg)).items():
        if key.startswith("trainer.callbacks."):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number (got {value})")
        if isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise UserError(f"{key} must hold finite numbers (got {value})")


def _check_causal_lm(dataset: DictConfig) -> None:
    for key in ("eval_size", "max_new_tokens"):
        _require(dataset[key] > 0, f"dataset.{key} must be > 0 (got {dataset[key]})")
    for key in ("generate_samples", "show_samples"):
        _require(dataset[key] >= 0, f"dataset.{key} must be >= 0 (got {dataset[key]})")
