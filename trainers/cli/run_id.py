"""``${run_id:}``: one run folder name per launch, shared by every process of a DDP launch."""

from __future__ import annotations

import os
import secrets
from datetime import datetime

from omegaconf import OmegaConf

RUN_ID_ENV = "LORA_LAB_RUN_ID"
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
