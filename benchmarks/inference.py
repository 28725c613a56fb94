"""Inference latency of our adapters merged into the model, against the plain model.

    python benchmarks/inference.py                  # MiniLM, batch 32 x 64 tokens, r=8, all linears
    python benchmarks/inference.py --quick --json inference.json

Eval-mode forward (``torch.inference_mode``) of the plain model, of LoRA, DoRA and SoRA after
``merge_model`` (the wrappers stay in place and call their merged base layer) and of LoRA unmerged,
timed round by round like the step benchmark. ``step_time.py`` runs this part on the variants it has
just trained; run alone, the adapters first take ``--train-steps`` training steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/inference.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from adapters import merge_model
from benchmarks.harness import (
    MODEL_NAME,
    Variant,
    add_clock_arg,
    add_malloc_arg,
    add_model_args,
    apply_malloc_arg,
    build_variant,
    check_clock_arg,
    command_line,
    environment,
    format_environment,
    interleaved_times,
    load_minilm,
    loadavg,
    make_batch,
)

INFERENCE_VARIANTS = ("plain", "lora_merged", "dora_merged", "sora_merged", "lora_unmerged")


def bench_inference(
    base: nn.Module,
    trained: dict[str, Variant],
    batch: dict[str, torch.Tensor],
    rounds: int = 5,
    steps_per_round: int = 3,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clock: str = "wall",
    log: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Eval-mode forward latency of the plain model and of our adapters merged into it (wrappers kept)."""
    device = torch.device(device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    models: dict[str, nn.Module] = {"plain": copy.deepcopy(base).to(device=device, dtype=dtype)}
    for kind in ("lora", "dora", "sora"):
        if kind in trained:
            merged = copy.deepcopy(trained[kind].model)
            merge_model(merged)
            models[f"{kind}_merged"] = merged
    if "lora" in trained:
        models["lora_unmerged"] = copy.deepcopy(trained["lora"].model)
    for model in models.values():
        model.eval()

    def forward(model: nn.Module) -> None:
        with torch.inference_mode():
            model(**inputs)

    runs = {n: (lambda m=m: forward(m)) for n, m in models.items()}
    times = interleaved_times(runs, rounds, steps_per_round, warmup, device, clock, log=log)
    plain = statistics.median(times["plain"])
    return {
        n: {"median_ms": 1e3 * statistics.median(t), "vs_plain": statistics.median(t) / plain,
            "times_ms": [round(1e3 * v, 3) for v in t]}
        for n, t in times.items()
    }


def format_inference(inference: dict[str, dict[str, float]]) -> list[str]:
    """The inference table (Markdown lines)."""
    lines = ["| inference (eval, no grad) | median (ms) | × plain |", "| --- | ---: | ---: |"]
    for name, row in inference.items():
        lines.append(f"| {name} | {row['median_ms']:.1f} | {row['vs_plain']:.3f} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_model_args(parser)
    add_clock_arg(parser)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=2, help="training steps of each adapter before merging")
    add_malloc_arg(parser)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 step")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.command = command_line("inference.py", argv)
    check_clock_arg(parser, args)
    if args.quick:
        args.rounds, args.steps_per_round = 2, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    apply_malloc_arg(args)
    base = load_minilm()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    started, load_before = time.perf_counter(), loadavg()
    batch = make_batch(base, args.batch_size, args.seq_len, device)
    trained: dict[str, Variant] = {}
    for kind in ("lora", "dora", "sora"):
        trained[kind] = build_variant(kind, base, r=args.r, lora_alpha=2 * args.r, device=device, dtype=dtype)
        for _ in range(args.train_steps):
            trained[kind].step(batch)
    timing: dict[str, Any] = {}
    inference = bench_inference(base, trained, batch, args.rounds, args.steps_per_round, args.warmup, device, dtype,
                                args.clock, log=timing)
    report: dict[str, Any] = {
        "command": args.command,
        "settings": {"model": MODEL_NAME, "batch_size": args.batch_size, "seq_len": args.seq_len, "r": args.r,
                     "lora_alpha": 2 * args.r, "train_steps": args.train_steps, "rounds": args.rounds,
                     "steps_per_round": args.steps_per_round, "warmup": args.warmup, "clock": args.clock,
                     "malloc": args.malloc},
        "environment": {**environment(device, dtype, args.threads), "loadavg_before": load_before,
                        "loadavg_after": loadavg()},
        "inference": inference,
        "rounds_discarded_for_other_load": timing,
        "wall_s": time.perf_counter() - started,
    }
    print("\n".join([*format_inference(inference), "", format_environment(report["environment"])]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
