"""Composed configs for tests: the one place that composes ``conf/`` with Hydra's compose API."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from trainers.cli.run_id import register_resolvers

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# a tiny random BERT on a few SST-2 examples: a whole run in about a second
TINY_RUN = ["model=tiny-random-bert", "dataset.max_train_samples=40", "dataset.max_eval_samples=20",
            "trainer.batch_size=8", "trainer.eval_batch_size=16", "trainer.log_every_steps=2"]

register_resolvers()


def compose_config(overrides: list[str] | None = None, hydra: bool = False, conf: Path = CONF) -> DictConfig:
    """``python main.py <overrides>``'s config (with Hydra's own node when ``hydra``; from another config folder
    with ``conf``), without running anything."""
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides or []), return_hydra_config=hydra)
