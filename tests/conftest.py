"""Shared test setup: offline Hugging Face, and the offline datasets folder (DATA_ROOT, else ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DATA_ROOT", str(REPO.parent / "shared" / "data"))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
