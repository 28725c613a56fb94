"""What the gradient-norm logging and the weight-decomposition analysis cost, against one training step.

    python benchmarks/analysis_cost.py                         # MiniLM, batch 32 x 64, lora / dora / full
    python benchmarks/analysis_cost.py --steps 3 --json cost.json

For each method (our layers on every linear layer, the head trained in full) it times, as medians over
``--steps`` repeats on the same batch: one training step (forward, backward, clip, AdamW), the global
gradient norm the loop computes at logged steps when clipping is off (with clipping on it is the clip's own
result, free), the per-component norms of ``trainer.log_grad_norms``, and one weight-decomposition record
(``analysis.every_steps``). The fractions assume ``--log-every`` and ``--analysis-every``. With everything
off the loop adds only a hook call and an integer test per step, which is what ``off_fraction`` reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import OmegaConf
from torch import nn

from adapters import weight_decomposition, wrap_linears
from benchmarks.harness import load_minilm, make_batch
from trainers.loop.grad_norms import classify_parameters, component_grad_norms
from trainers.loop.hooks import TrainerCallback
from trainers.loop.trainer import total_grad_norm
from trainers.methods import get_method

METHODS = ("lora", "dora", "full")


def median_time(fn: Any, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(base: nn.Module, method: str, batch: dict[str, torch.Tensor], steps: int, log_every: int,
            analysis_every: int) -> dict[str, float]:
    """Seconds of a step and of each piece of logging / analysis, and their share of a step."""
    import copy

    model = copy.deepcopy(base)
    wrap_linears(model, "all-linear", adapter=method, r=8, lora_alpha=16, modules_to_save=["classifier"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step_s = median_time(step, steps)
    model(**batch).loss.backward()  # gradients in place for the norms
    patterns = {**get_method(method).grad_components(OmegaConf.create({})), "head": r"(^|\.)classifier\."}
    groups = classify_parameters([(n, p) for n, p in model.named_parameters() if p.requires_grad], patterns)
    norm_s = median_time(lambda: float(total_grad_norm(params)), steps)
    components_s = median_time(lambda: component_grad_norms(groups)[1].tolist(), steps)
    analysis_s = median_time(lambda: weight_decomposition(model), max(1, steps // 2))
    hooks = [TrainerCallback() for _ in range(4)]
    hook_s = median_time(lambda: [h.on_before_optimizer_step(None) for h in hooks], 1000)
    return {
        "step_s": step_s, "grad_norm_s": norm_s, "component_norms_s": components_s,
        "weight_decomposition_s": analysis_s, "hook_s": hook_s,
        "off_fraction": hook_s / step_s,
        "grad_norm_no_clip_fraction": norm_s / log_every / step_s,
        "log_grad_norms_fraction": components_s / log_every / step_s,
        "analysis_fraction": analysis_s / analysis_every / step_s,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="repeats per timing (median)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=20, help="trainer.log_every_steps the fractions assume")
    parser.add_argument("--analysis-every", type=int, default=100, help="analysis.every_steps the fractions assume")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, base: nn.Module) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    batch = make_batch(base, args.batch_size, args.seq_len, torch.device("cpu"))
    report = {"settings": vars(args) | {"json": str(args.json) if args.json else None},
              "methods": {m: measure(base, m, batch, args.steps, args.log_every, args.analysis_every)
                          for m in args.methods}}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args, load_minilm())
    print("| method | step (ms) | off | grad_norm, no clipping | log_grad_norms | analysis |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in report["methods"].items():
        print(f"| {name} | {1e3 * row['step_s']:.1f} | {100 * row['off_fraction']:.4f} % | "
              f"{100 * row['grad_norm_no_clip_fraction']:.3f} % | {100 * row['log_grad_norms_fraction']:.3f} % | "
              f"{100 * row['analysis_fraction']:.3f} % |")


if __name__ == "__main__":
    main()
