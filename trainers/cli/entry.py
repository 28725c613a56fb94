"""The ``lora-lab`` console script: exactly ``python main.py``, with the config groups found inside the package.

``trainers/conf`` is the project's ``conf/`` (a link to it in a source checkout, a copy of it in a built wheel),
so ``pip install .`` and then ``lora-lab adapter=sora sparse_lambda=0.4`` works from any folder.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from trainers.cli.app import register_resolvers, run_cli

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _task(cfg: DictConfig) -> float:
    """The Hydra task of ``main.py``: train, return the final eval_accuracy (what sweepers optimise)."""
    from trainers.cli.job import run_job

    return run_job(cfg)


def main() -> None:
    """``lora-lab [overrides]``: the same arguments, outputs and exit statuses as ``python main.py``."""
    register_resolvers()
    run_cli(_task)


if __name__ == "__main__":
    main()
