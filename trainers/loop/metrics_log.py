"""A run's metric files: ``metrics.jsonl`` (one line per logged step / evaluation) and ``metrics.json`` (final)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainers.core.files import atomic_write_text

METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
RESULT_FILES = (METRICS_JSON, METRICS_JSONL, "checkpoints", "adapter", "tasks", "analysis")


def has_results(run_dir: Path) -> bool:
    """True if ``run_dir`` holds anything a run writes (metrics, checkpoints, an exported adapter)."""
    run_dir = Path(run_dir)
    for name in RESULT_FILES:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            return True
    return False


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends JSON lines to ``metrics.jsonl`` and writes ``metrics.json``; a no-op on non-main processes."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl = self.run_dir / METRICS_JSONL
        self.num_lines = 0

    def _lines(self, path: Path) -> list[str]:
        if not path.is_file():
            return []
        return path.read_text(encoding="utf-8").splitlines(keepends=True)

    def restart(self, keep_lines: int = 0, source: Path | None = None) -> None:
        """Keep the first ``keep_lines`` lines (of ``source``'s jsonl, default this run's); drop the rest.

        A resumed run drops what was logged after its checkpoint, so the file ends up exactly as the
        uninterrupted run's.
        """
        lines = self._lines(Path(source) / METRICS_JSONL if source else self.jsonl)[:keep_lines]
        self.num_lines = len(lines)
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.jsonl, "".join(lines))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it must hold ``step``)."""
        assert "step" in record, "every metrics.jsonl line needs a step"
        self.num_lines += 1
        if self.enabled:
            with self.jsonl.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def write_final(self, metrics: dict[str, Any]) -> None:
        if self.enabled:
            write_metrics_json(self.run_dir, metrics)


def write_metrics_json(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Atomically write ``metrics.json``."""
    atomic_write_text(Path(run_dir) / METRICS_JSON,
                      json.dumps({k: _clean(v) for k, v in metrics.items()}, indent=2) + "\n")
