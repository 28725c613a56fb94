"""trainer.compile=true: the compiled run trains like the eager one, and checkpoints / exports keep plain keys."""

from __future__ import annotations

import json

import pytest
import torch
from _config import compose_config
from _trainer_helpers import TINY
from safetensors.torch import load_file

from trainers.experiments.single import train_run


def compile_works() -> bool:
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception:  # no working backend (e.g. no C++ compiler for inductor)
        return False
    return True


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [rec["loss"] for rec in map(json.loads, lines) if "loss" in rec and "eval_loss" not in rec]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(torch, "compile") or not compile_works(), reason="torch.compile unavailable")
def test_compiled_run_matches_eager_and_saves_plain_keys(tmp_path, one_thread, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # the base model's dropout draws as in eager
    # no adapter dropout (its shared-mask cache is Python state), the same batches: the losses must agree
    args = [*TINY, "adapter.lora_dropout=0.0", "trainer.max_steps=4", "trainer.log_every_steps=1",
            "trainer.save_every_steps=2", "trainer.group_by_length=false"]
    runs = {}
    for flag in ("false", "true"):
        run = tmp_path / flag
        metrics = train_run(compose_config([*args, f"trainer.compile={flag}"]), run)
        assert metrics["status"] == "completed"
        runs[flag] = run
    eager, compiled = losses(runs["false"]), losses(runs["true"])
    assert len(eager) == 4
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for name in ("checkpoints/step-00000004/adapter.safetensors", "adapter/adapter_model.safetensors"):
        keys = load_file(str(runs["true"] / name)).keys()
        assert keys == load_file(str(runs["false"] / name)).keys()
        assert not any("_orig_mod" in k for k in keys)
