"""Matplotlib without a display (Agg), and one way to finish and save a figure atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainers.core.files import atomic_write


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (works on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int | None = None) -> Path:
    """Lay out ``fig``, write it as PNG to ``path`` atomically and close it."""
    plt = pyplot()
    if not fig.get_constrained_layout():
        fig.tight_layout()
    with atomic_write(Path(path)) as tmp:
        fig.savefig(tmp, format="png", **({"dpi": dpi} if dpi else {}))
    plt.close(fig)
    return Path(path)
