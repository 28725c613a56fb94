"""A training step between log steps reads nothing back from the device (no ``.item()``, ``.tolist()``,
``.cpu()``, ``float(tensor)``) in the project's own code (``trainers/``, ``adapters/``): losses and counts are
summed on the device and read at log steps only. (What torch and transformers do inside is theirs.)"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _config import TINY_RUN, compose_config

from trainers.experiments.single import train_run
from trainers.loop.hooks import TrainerCallback

READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")
OURS = tuple(str(Path(__file__).resolve().parents[3] / folder) for folder in ("trainers", "adapters"))


class CountReads(TrainerCallback):
    """Counts device reads from the start of each optimizer step to its end (forward, backward, optimizer)."""

    active = False
    reads: list[str] = []

    def on_step_begin(self, trainer: Any) -> None:
        CountReads.active = True

    def on_step_end(self, trainer: Any) -> None:
        CountReads.active = False


@pytest.fixture
def counted(monkeypatch):
    CountReads.reads = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            if CountReads.active:
                caller = sys._getframe(1).f_code
                if caller.co_filename.startswith(OURS):
                    CountReads.reads.append(f"{_name} in {caller.co_filename}:{caller.co_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    yield CountReads
    CountReads.active = False


@pytest.mark.parametrize("adapter", ["lora", "dora", "sora", "loraplus"])
def test_no_device_reads_inside_training_steps(adapter, tmp_path, counted):
    cfg = compose_config([*TINY_RUN, f"adapter={adapter}", "trainer.log_every_steps=100",
                          "trainer.save_every_steps=0", "+trainer.callbacks.count._target_=test_host_sync.CountReads"])
    result = train_run(cfg, tmp_path)
    assert result["global_step"] == 5
    assert counted.reads == []
