"""``<run_dir>/adapter/``: the trained adapter in PEFT's format (or the raw adapter state where PEFT has none)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trainers.core.files import publish_dir

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"


def export_adapter(model: Any, run_dir: Path) -> Path:
    """Write ``<run_dir>/adapter/`` atomically (a half-written export never replaces a complete one)."""
    from safetensors.torch import save_file

    from adapters import adapter_state_dict, export_peft

    def fill(folder: Path) -> None:
        try:
            export_peft(model, folder)
        except ValueError as exc:  # e.g. Gumbel CL-LoRA has no PEFT format
            log.warning("no PEFT export (%s); writing adapter/adapter_state.safetensors instead", exc)
            for file in folder.iterdir():
                file.unlink()
            save_file({k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()},
                      str(folder / "adapter_state.safetensors"))

    return publish_dir(Path(run_dir) / ADAPTER_DIR, fill)
