"""Checkpoints: the full training state, written atomically under ``<run_dir>/checkpoints/step-NNNNNNNN/``.

A checkpoint folder holds
  ``adapter.safetensors``   adapter + task-head weights (``adapters.adapter_state_dict``),
  ``training_state.pt``     the named optimizers' and schedulers' states and the grad scaler's
                            (``torch.load(weights_only=True)``),
  ``rng_state_<rank>.pt``   python / numpy / torch RNG states of every process,
  ``trainer_state.json``    step counters, data position, running sums, callback states, the config.
It is written to a hidden temporary folder and renamed into place, so a kill leaves either the old
set of checkpoints or the new one, never a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from trainers.core.errors import UserError, first_line
from trainers.core.files import fsync_dir

# 2: optimizers and schedulers saved by name (whatever the method plug-in contributes); 1: two fixed slots
FORMAT_VERSION = 2
STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "adapter.safetensors"
OBJECTS_FILE = "training_state.pt"
# Keys that may differ between a checkpoint and the run resuming it (they do not change the results).
RESUME_FREE_KEYS = ("resume", "data_root", "trainer.eval_batch_size", "trainer.num_workers",
                    "trainer.save_every_steps", "trainer.keep_last_checkpoints", "trainer.log_every_steps",
                    "trainer.eval_every_steps", "trainer.callbacks", "trainer.save_merged",
                    "trainer.log_grad_norms", "analysis", "trainer.on_nonfinite",
                    "trainer.max_skipped_steps", "logger", "model.hub_id")


# --------------------------------------------------------------------------------------------- finding
def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume_path(path: str) -> Path:
    """A checkpoint folder, or a run folder (-> its newest checkpoint)."""
    p = Path(path).expanduser()
    if (p / STATE_FILE).is_file():
        return p
    if p.is_dir():
        newest = latest_checkpoint(p)
        if newest is not None:
            return newest
    raise UserError(f"resume={path}: no checkpoint there (expected a checkpoints/step-* folder or a run folder "
                    f"that has one)")


# --------------------------------------------------------------------------------------------- config
def config_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config (without ``hydra``) as flat ``dotted.key -> value``."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node

    walk("", container)
    return flat


# keys added after checkpoints were first written: a checkpoint without one was written with this value
ADDED_KEY_DEFAULTS: dict[str, Any] = {"trainer.eval_every_epochs": 0, "trainer.metric_for_best": "eval_score",
                                      "trainer.load_best_at_end": False, "trainer.early_stopping_patience": 0}


def _free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_FREE_KEYS)


# Keys added after checkpoints were first written, with the value that gives the results of the time before:
# a checkpoint without such a key matches a config that holds this value.
ADDED_KEYS = {"trainer.lr_scheduler": "linear", "trainer.lr_scheduler_kwargs": None}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key that matters for the results and differs."""
    saved = {**{k: v for k, v in ADDED_KEYS.items() if k in current}, **saved}
    keys = sorted(k for k in set(saved) | set(current) if not _free(k))
    saved = {**{k: v for k, v in ADDED_KEY_DEFAULTS.items() if k in current}, **saved}
    return [f"{k}={saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
            for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]


def read_state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint; UserError if unreadable."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("format"), int):
            raise ValueError("unknown format")
    except (OSError, ValueError) as exc:
        raise UserError(f"corrupt checkpoint {path}: cannot read {STATE_FILE} ({exc})") from None
    if state["format"] < FORMAT_VERSION:
        raise UserError(f"checkpoint {path} was written by an older layout of this tool (checkpoint format "
                        f"{state['format']}, this version reads {FORMAT_VERSION}); resume it with the version that "
                        f"wrote it, or start a new run")
    if state["format"] > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} was written by a newer version of this tool (checkpoint format "
                        f"{state['format']}, this version reads {FORMAT_VERSION}); update the tool to resume it")
    return state


def check_compatible(path: Path, cfg: DictConfig, world_size: int | None = None) -> dict[str, Any]:
    """Raise UserError if the checkpoint at ``path`` was written by a different config or world size."""
    state = read_state(path)
    diffs = config_differences(state.get("config", {}), config_fingerprint(cfg))
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise UserError(f"checkpoint {path} does not match this config: {'; '.join(diffs[:3])}{more}; "
                        f"repeat the original overrides to resume")
    if world_size is not None and state.get("world_size") != world_size:
        raise UserError(f"checkpoint {path} was written by {state.get('world_size')} process(es), this run has "
                        f"{world_size}; resume with the same number of processes")
    return state


# --------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """All RNG states of this process, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- save / load
BEST_NAME = "best"  # the checkpoint of the best evaluation (trainer.load_best_at_end)


def step_name(step: int) -> str:
    """Folder name of the regular checkpoint at ``step`` (the ones resume=auto and pruning consider)."""
    return f"step-{step:08d}"


def temporary_dir(run_dir: Path, name: str) -> Path:
    return checkpoint_root(run_dir) / f".tmp-{name}"


def write_rng(tmp: Path, rank: int) -> None:
    """Every process writes its own RNG state into the (shared) temporary folder."""
    torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")


def write_main(tmp: Path, weights: dict[str, torch.Tensor], objects: dict[str, Any], state: dict[str, Any]) -> None:
    """The main process writes weights, optimizer/scheduler states and the trainer state."""
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
    torch.save(objects, tmp / OBJECTS_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({"format": FORMAT_VERSION, **state}, indent=1), encoding="utf-8")


def publish(run_dir: Path, name: str, keep_last: int) -> Path:
    """Rename the temporary folder to ``checkpoints/<name>``, then delete all but the newest ``keep_last``
    regular (``step-*``) checkpoints. Other names (e.g. one per stage) are kept."""
    root = checkpoint_root(run_dir)
    tmp = temporary_dir(run_dir, name)
    final = root / name
    for file in os.listdir(tmp):
        with open(tmp / file, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving under the same name: move the old one away first
        trash = root / f".old-{name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def prepare_temporary(run_dir: Path, name: str) -> Path:
    tmp = temporary_dir(run_dir, name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The adapter (and saved modules') weights of the checkpoint at ``path``; UserError if unreadable."""
    try:
        return load_file(str(Path(path) / WEIGHTS_FILE))
    except Exception as exc:
        raise UserError(f"corrupt checkpoint {path}: cannot read {WEIGHTS_FILE} ({first_line(exc)})") from None


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any],
                                                    dict[str, Any]]:
    """``(weights, objects, trainer_state, rng_state)``; UserError naming the file if anything is unreadable."""
    state = read_state(path)
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:
        raise UserError(f"corrupt checkpoint {path}: cannot read {WEIGHTS_FILE} ({exc})") from None
    loaded = []
    for name in (OBJECTS_FILE, f"rng_state_{rank}.pt"):
        try:
            loaded.append(torch.load(path / name, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise UserError(f"corrupt checkpoint {path}: cannot read {name} ({first_line(exc)})") from None
    return weights, loaded[0], state, loaded[1]
