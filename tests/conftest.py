"""Shared test setup: offline Hugging Face, the offline datasets folder (DATA_ROOT, else ../shared/data), composed
configs as a fixture, and the ``slow`` marker on tests that start ``main.py`` in a subprocess.

``python -m pytest tests`` runs everything (as CI does); ``-m "not slow"`` skips the end-to-end subprocess tests.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
os.environ.setdefault("DATA_ROOT", str(REPO.parent / "shared" / "data"))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
if str(TESTS) not in sys.path:  # the shared helpers (_config, _tiny_models, ...) for tests in sub-folders
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def compose() -> Callable[..., object]:
    """``compose(overrides, hydra=False)``: the config ``python main.py <overrides>`` would run with."""
    from _config import compose_config

    return compose_config


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of modules that launch ``main.py`` as a subprocess (through ``_trainer_helpers.run_main``) are slow."""
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "run_main"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (small in-process runs; steadier on a shared machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
