"""Train a LoRA-family adapter from the command line.

    python main.py                                  # LoRA on MiniLM on SST-2 (the defaults in conf/)
    python main.py adapter=sora sparse_lambda=0.4   # any config key can be overridden
    python main.py -m adapter=sora sparse_lambda=0.0,0.2,0.4   # a sweep: one folder per job + summary.csv

Returns the final eval_score (the task's main metric: accuracy for SST-2, Matthews correlation for CoLA, ...),
so Hydra sweepers (e.g. optuna) can optimise it.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from trainers.cli.app import register_resolvers, run_cli

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Build model, adapter, data and trainer from ``cfg``; train; return the validation accuracy."""
    from trainers.cli.job import run_job

    return run_job(cfg)


if __name__ == "__main__":
    run_cli(main)
