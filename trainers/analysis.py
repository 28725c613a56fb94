"""``python -m trainers.analysis RUN_OR_SWEEP_DIR [...]``: the weight-decomposition analysis of finished runs.

For each run folder (the folder itself, or every job folder of a sweep) the model is rebuilt from its
``.hydra/config.yaml`` exactly as the run built it (same seed, so random models get the same W_0), every kept
checkpoint (``checkpoints/step-*``) is loaded, and dM / dD of every adapted layer are computed
(:mod:`trainers.reports.weight_decomposition`). Rows of steps that have no checkpoint any more but are already
in ``analysis/weight_decomposition.csv`` are kept; the CSV and the scatter are rewritten. For a sweep the
panels of every method also go to ``<sweep>/weight_decomposition.png``. Prints one line per run and the
correlation per method; exit status 1 with one ``error:`` line when a folder holds no run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from trainers.core.errors import UserError, first_line


def run_folders(path: Path) -> list[Path]:
    """``path`` if it is a run folder (has ``.hydra/config.yaml``), else its job folders in job order."""
    if (path / ".hydra" / "config.yaml").is_file():
        return [path]
    jobs = {p.parent.parent for p in path.glob("**/.hydra/config.yaml")}
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, str(p)))


def checkpoint_rows(run_dir: Path) -> list[dict[str, Any]]:
    """dM / dD of every adapted layer at every kept checkpoint of ``run_dir`` (the model rebuilt from its config)."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from adapters import load_adapter_state_dict, weight_decomposition
    from trainers.core.config import without_hydra
    from trainers.data.continual import is_continual
    from trainers.experiments.session import Session
    from trainers.loop.checkpoint import WEIGHTS_FILE, list_checkpoints, read_state

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return []
    cfg = without_hydra(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    if is_continual(cfg.dataset):
        raise UserError(f"{run_dir} is a continual-learning run; its per-task adapters are not analysed")
    session = Session(cfg)
    data = session.objective.build_data(cfg.dataset, cfg.data_root)
    model, _ = session.build_model(data)
    rows: list[dict[str, Any]] = []
    for path in checkpoints:
        step = int(read_state(path)["state"]["global_step"])
        try:
            load_adapter_state_dict(model, load_file(str(path / WEIGHTS_FILE)))
        except (OSError, ValueError) as exc:
            raise UserError(f"checkpoint {path} does not fit the model of {run_dir}: {first_line(exc)}") from None
        rows += [{"method": str(cfg.adapter.name), "step": step, **row} for row in weight_decomposition(model)]
    return rows


def analyse_run(run_dir: Path) -> list[dict[str, Any]]:
    """Recompute the run's rows from its checkpoints, keep the CSV's other steps, rewrite CSV and scatter."""
    from trainers.reports.weight_decomposition import plot_run_decomposition, read_rows, write_rows

    fresh = checkpoint_rows(run_dir)
    steps = {r["step"] for r in fresh}
    rows = [r for r in read_rows(run_dir) if r["step"] not in steps] + fresh
    if not rows:
        raise UserError(f"{run_dir} has no checkpoints and no analysis/weight_decomposition.csv to analyse")
    write_rows(run_dir, rows)
    plot_run_decomposition(run_dir)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.analysis", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or sweep folders")
    args = parser.parse_args(argv)
    from trainers.reports.weight_decomposition import correlations, plot_sweep_decomposition

    status = 0
    for path in args.paths:
        runs = run_folders(path)
        if not runs:
            print(f"error: {path} holds no run folder (no .hydra/config.yaml)", file=sys.stderr)
            status = 1
            continue
        for run in runs:
            try:
                rows = analyse_run(run)
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                status = 1
                continue
            corr = ", ".join(f"{m} {c:+.3f}" for m, c in correlations(rows).items())
            print(f"{run}: {len(rows)} rows, steps {sorted({r['step'] for r in rows})}, corr(dM, dD) {corr}")
        if len(runs) > 1 or runs[0] != path:
            scatter, corr = plot_sweep_decomposition(path, runs)
            if scatter is not None:
                shown = ", ".join(f"{m} {c:+.3f}" for m, c in corr.items())
                print(f"{path}: corr(dM, dD) per method: {shown}; scatter {scatter}")
    return status


if __name__ == "__main__":
    sys.exit(main())
