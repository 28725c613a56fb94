"""Mixed precision through accelerate: bf16 autocast trains on a CPU; fp16 on a CPU is refused."""

from __future__ import annotations

import math

import torch
from _trainer_helpers import TINY, read_json, run_main, stderr_lines
from safetensors.torch import load_file


def test_bf16_run_trains_with_float32_adapter_weights(tmp_path):
    run = tmp_path / "run"
    proc = run_main([*TINY, "adapter=sora", "trainer.precision=bf16", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "completed" and math.isfinite(metrics["eval_loss"])
    (checkpoint,) = sorted((run / "checkpoints").glob("step-*"))
    weights = load_file(str(checkpoint / "adapter.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())  # master weights stay fp32
    trained = [k for k in weights if k.endswith("lora_B")]
    assert trained and any(weights[k].abs().sum() > 0 for k in trained)  # B left zero init: updates happened


def test_fp16_on_cpu_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    proc = run_main([*TINY, "trainer.precision=fp16", f"hydra.run.dir={run}"])
    assert proc.returncode == 1
    lines = stderr_lines(proc)
    assert lines == ["error: trainer.precision=fp16 needs a GPU (on a CPU it would silently train in float32); "
                     "use trainer.precision=bf16 or fp32"]
    assert read_json(run / "metrics.json")["status"] == "failed"  # a fresh folder records the failure
