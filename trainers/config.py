"""Config schemas and checks: every key of every config group is declared here, so a typo is an error.

The YAML files under ``conf/`` hold the defaults and the documentation; the dataclasses below only
declare which keys exist and their types (all ``MISSING``, so a key missing from a YAML file is an
error too). Later config options register their schema in the ``*_SCHEMAS`` tables.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainers.errors import UserError

RUN_ID_ENV = "LORA_LAB_RUN_ID"


# --------------------------------------------------------------------------------------------- schemas
@dataclass
class LoraSchema:
    name: str = MISSING
    r: int = MISSING
    lora_alpha: float = MISSING
    lora_dropout: float = MISSING
    target_modules: Any = MISSING
    use_rslora: bool = False


@dataclass
class SoraSchema(LoraSchema):
    gate_lr: float = MISSING
    gate_init: str = MISSING
    threshold_mode: str = MISSING
    l1_lambda: float = MISSING


@dataclass
class GumbelSchema(LoraSchema):
    tau_init: float = MISSING
    tau_final: float = MISSING
    anneal_rate: float = MISSING
    lambda_sparsity: float = MISSING
    growth_threshold: float = MISSING
    conditional_growth: bool = MISSING
    gate_logit_lr: float | None = MISSING


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
class AlphaDoublingScheduleSchema:
    name: str = MISSING
    alpha_start: float = MISSING
    alpha_growth: float = MISSING


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
class ConstantScheduleSchema:
    name: str = MISSING


@dataclass
class XiStagesScheduleSchema:
    name: str = MISSING
    xi_start: float = MISSING
    xi_max: float = MISSING
    xi_step: float = MISSING
    epochs_per_stage: int = MISSING
    max_steps_per_stage: int | None = MISSING
    reset_optimizers: bool = MISSING


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
    gate_warmup_ratio: float = MISSING
    max_grad_norm: float = MISSING
    grad_accum_steps: int = MISSING
    precision: str = MISSING
    log_every_steps: int = MISSING
    eval_every_steps: int = MISSING
    save_every_steps: int = MISSING
    keep_last_checkpoints: int = MISSING
    num_workers: int = MISSING
    save_merged: bool = MISSING
    callbacks: dict[str, Any] = field(default_factory=dict)
    eval_at_start: bool = False


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


ADAPTER_SCHEMAS: dict[str, type] = {
    "lora": LoraSchema,
    "dora": LoraSchema,
    "sora": SoraSchema,
    "gumbel": GumbelSchema,
}
SCHEDULE_SCHEMAS: dict[str, type] = {"constant": ConstantScheduleSchema, "xi_stages": XiStagesScheduleSchema,
                                     "alpha_doubling": AlphaDoublingScheduleSchema}
# datasets whose keys differ from DatasetSchema (by dataset.name)
DATASET_SCHEMAS: dict[str, type] = {"english_quotes": CausalLMDatasetSchema,
                                    **{name: ContinualDatasetSchema
                                       for name in ("clinc150_cl", "banking77_cl", "cifar100_cl", "mnist_cl")}}
PRECISIONS = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


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


def task_config(cfg: DictConfig) -> DictConfig:
    """The config without Hydra's own ``hydra`` node."""
    if "hydra" not in cfg:
        return cfg
    return OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])


def validate_config(cfg: DictConfig) -> None:
    """Check every key and value of a composed config; raise UserError with one line on the first problem."""
    _check_keys(task_config(cfg), RootSchema, "config")

    adapter_name = cfg.adapter.get("name") if isinstance(cfg.adapter, DictConfig) else None
    _require(adapter_name in ADAPTER_SCHEMAS,
             f"unknown adapter.name {adapter_name!r} (choose from: {', '.join(sorted(ADAPTER_SCHEMAS))})")
    adapter = _check_keys(cfg.adapter, ADAPTER_SCHEMAS[adapter_name], "adapter")
    model = _check_keys(cfg.model, ModelSchema, "model")
    _require(model.modality in ("text", "image"), f"model.modality must be text or image (got {model.modality!r})")
    dataset_name = cfg.dataset.get("name") if isinstance(cfg.dataset, DictConfig) else None
    dataset = _check_keys(cfg.dataset, DATASET_SCHEMAS.get(dataset_name, DatasetSchema), "dataset")
    schedule_name = cfg.schedule.get("name") if isinstance(cfg.schedule, DictConfig) else None
    _require(schedule_name in SCHEDULE_SCHEMAS,
             f"unknown schedule.name {schedule_name!r} (choose from: {', '.join(sorted(SCHEDULE_SCHEMAS))})")
    schedule = _check_keys(cfg.schedule, SCHEDULE_SCHEMAS[schedule_name], "schedule")
    trainer = _check_keys(cfg.trainer, TrainerSchema, "trainer")

    _require(adapter.r > 0, f"adapter.r must be > 0 (got {adapter.r})")
    _require(0.0 <= adapter.lora_dropout < 1.0, f"adapter.lora_dropout must be in [0, 1) (got {adapter.lora_dropout})")
    targets = adapter.target_modules
    _require(isinstance(targets, str) or (OmegaConf.is_list(targets) and len(targets) > 0
                                           and all(isinstance(t, str) for t in targets)),
             f"adapter.target_modules must be a string or a non-empty list of strings (got {targets})")
    _require(cfg.sparse_lambda >= 0, f"sparse_lambda must be >= 0 (got {cfg.sparse_lambda})")
    if adapter_name == "sora":
        _require(adapter.gate_lr > 0, f"adapter.gate_lr must be > 0 (got {adapter.gate_lr})")
        _require(adapter.gate_init in ("ones", "randn"),
                 f"adapter.gate_init must be ones or randn (got {adapter.gate_init!r})")
        _require(adapter.threshold_mode in ("lr_scaled", "absolute"),
                 f"adapter.threshold_mode must be lr_scaled or absolute (got {adapter.threshold_mode!r})")
        _require(adapter.l1_lambda >= 0, f"adapter.l1_lambda must be >= 0 (got {adapter.l1_lambda})")
    if adapter_name == "gumbel":
        _require(adapter.tau_init > 0 and adapter.tau_final > 0, "adapter.tau_init and adapter.tau_final must be > 0")
        _require(0 < adapter.anneal_rate <= 1, f"adapter.anneal_rate must be in (0, 1] (got {adapter.anneal_rate})")
        _require(adapter.lambda_sparsity >= 0,
                 f"adapter.lambda_sparsity must be >= 0 (got {adapter.lambda_sparsity})")
        _require(adapter.gate_logit_lr is None or adapter.gate_logit_lr > 0,
                 f"adapter.gate_logit_lr must be null or > 0 (got {adapter.gate_logit_lr})")

    if schedule_name == "xi_stages":
        _require(adapter_name == "sora", f"schedule=xi_stages schedules SoRA's gate sparsity; it needs adapter=sora "
                                         f"(got adapter={adapter_name})")
        _require(0 <= schedule.xi_start <= schedule.xi_max and schedule.xi_step > 0,
                 f"schedule.xi_start/xi_max/xi_step must satisfy 0 <= xi_start <= xi_max and xi_step > 0 "
                 f"(got {schedule.xi_start}, {schedule.xi_max}, {schedule.xi_step})")
        _require(schedule.epochs_per_stage > 0 or (schedule.max_steps_per_stage or 0) > 0,
                 "schedule.epochs_per_stage or schedule.max_steps_per_stage must be > 0")
        _require(schedule.max_steps_per_stage is None or schedule.max_steps_per_stage > 0,
                 f"schedule.max_steps_per_stage must be null or > 0 (got {schedule.max_steps_per_stage})")
        from trainers.schedules import xi_values

        try:
            xi_values(schedule.xi_start, schedule.xi_max, schedule.xi_step)
        except ValueError as exc:
            raise UserError(f"schedule: {exc}") from None
    for key in ("max_train_samples", "max_eval_samples"):
        value = dataset[key]
        _require(value is None or value > 0, f"dataset.{key} must be null or > 0 (got {value})")
    _require(dataset.max_seq_length > 0, f"dataset.max_seq_length must be > 0 (got {dataset.max_seq_length})")
    if DATASET_SCHEMAS.get(dataset_name) is ContinualDatasetSchema:
        from trainers.continual_data import check_continual_config

        check_continual_config(dataset)
    _require(dataset.task in ("classification", "causal_lm"),
             f"dataset.task must be classification or causal_lm (got {dataset.task!r})")
    if dataset.task == "causal_lm":
        _check_causal_lm(dataset)
    if schedule_name == "alpha_doubling":
        _require(cfg.schedule.alpha_start > 0, f"schedule.alpha_start must be > 0 (got {cfg.schedule.alpha_start})")
        _require(cfg.schedule.alpha_growth > 0, f"schedule.alpha_growth must be > 0 (got {cfg.schedule.alpha_growth})")

    _require(trainer.epochs > 0 or (trainer.max_steps or 0) > 0,
             "trainer.epochs or trainer.max_steps must be > 0")
    _require(trainer.max_steps is None or trainer.max_steps > 0,
             f"trainer.max_steps must be null or > 0 (got {trainer.max_steps})")
    for key in ("batch_size", "eval_batch_size", "grad_accum_steps", "log_every_steps", "keep_last_checkpoints"):
        _require(trainer[key] > 0, f"trainer.{key} must be > 0 (got {trainer[key]})")
    for key in ("eval_every_steps", "save_every_steps", "num_workers", "weight_decay", "max_grad_norm"):
        _require(trainer[key] >= 0, f"trainer.{key} must be >= 0 (got {trainer[key]})")
    _require(trainer.base_lr > 0, f"trainer.base_lr must be > 0 (got {trainer.base_lr})")
    _require(len(trainer.betas) == 2 and all(0 <= b < 1 for b in trainer.betas),
             f"trainer.betas must be two numbers in [0, 1) (got {list(trainer.betas)})")
    for key in ("warmup_ratio", "gate_warmup_ratio"):
        _require(0 <= trainer[key] <= 1, f"trainer.{key} must be in [0, 1] (got {trainer[key]})")
    _require(trainer.precision in PRECISIONS,
             f"trainer.precision must be one of {', '.join(PRECISIONS)} (got {trainer.precision!r})")
    resume = cfg.resume
    _require(resume is None or isinstance(resume, str), f"resume must be null, auto or a path (got {resume!r})")


def _check_causal_lm(dataset: DictConfig) -> None:
    for key in ("eval_size", "max_new_tokens"):
        _require(dataset[key] > 0, f"dataset.{key} must be > 0 (got {dataset[key]})")
    for key in ("generate_samples", "show_samples"):
        _require(dataset[key] >= 0, f"dataset.{key} must be >= 0 (got {dataset[key]})")


# --------------------------------------------------------------------------------------------- resolvers
_RUN_ID: str | None = None


def run_id() -> str:
    """``<date>/<time>-<6 hex>``: unique per launch, fixed within a process.

    All processes of one DDP launch share the value the CLI broadcasts through ``LORA_LAB_RUN_ID``.
    """
    global _RUN_ID
    if _RUN_ID is None:
        _RUN_ID = os.environ.get(RUN_ID_ENV) or f"{datetime.now():%Y-%m-%d/%H-%M-%S}-{secrets.token_hex(3)}"
    return _RUN_ID


def set_run_id(value: str) -> None:
    """Use ``value`` for ``${run_id:}`` in this process (DDP: every process takes process 0's)."""
    global _RUN_ID
    _RUN_ID = value
    os.environ[RUN_ID_ENV] = value


def register_resolvers() -> None:
    """Register ``${run_id:}`` (used by hydra.run.dir and hydra.sweep.dir)."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
