"""``<run_dir>/adapter/``: the trained adapter in PEFT's format (or the raw adapter state where PEFT has none)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trainers.core.errors import NonFiniteError
from trainers.core.files import publish_dir
from trainers.loop.nonfinite import nonfinite_names

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"


def export_adapter(model: Any, run_dir: Path) -> Path:
    """Write ``<run_dir>/adapter/`` atomically (a half-written export never replaces a complete one).

    Raises NonFiniteError (writing nothing) if an adapter tensor holds a NaN or an infinity."""
    from safetensors.torch import save_file

    from adapters import adapter_state_dict, export_peft

    bad = nonfinite_names(adapter_state_dict(model))
    if bad:  # e.g. an end-of-run step broke the weights: keep the last good checkpoint, export nothing
        raise NonFiniteError(f"not exporting the adapter: {bad[0]} holds non-finite values"
                             + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""),
                             {"reason": f"non-finite weights in {bad[0]}"})

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
