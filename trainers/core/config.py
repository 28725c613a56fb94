"""Small helpers on composed configs that several layers need."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The run's own config: ``cfg`` without Hydra's ``hydra`` node."""
    if "hydra" not in cfg:
        return cfg
    return OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
