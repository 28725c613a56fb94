"""Training-step time of our adapters against the frozen model's floor, PEFT and full fine-tuning.

    python benchmarks/step_time.py                  # MiniLM, batch 32 x 64 tokens, r=8, all linears
    python benchmarks/step_time.py --quick          # a fast smoke run (fewer rounds, no end-to-end part)
    python benchmarks/step_time.py --device cuda --dtype bfloat16

One step is forward, backward and the optimizer (AdamW on the trainable parameters, fused as main.py runs it:
``--optimizer-impl``) on the embedded all-MiniLM-L6-v2 with a classification head. The variants
(``harness.build_variant``):

    floor      the frozen model: forward + backward through the activations only (the embedding
               output requires grad), no weight gradient and no optimizer; no adapter can be cheaper
    lora, dora, sora             ours, ``wrap_linears(model, "all-linear", ...)``
    peft_lora, peft_dora         Hugging Face PEFT on the same 37 layers with the same settings
    full       full fine-tuning: AdamW on every parameter

Variants are timed round by round with a rotating order after a warm-up; the report gives medians,
the ratios to the floor and to PEFT, and the peak memory of one step. The same run then measures
merged inference (``inference.py``) and the trainer end to end (``trainer_overhead.py``), checks the
issue's targets, prints a table and writes a JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/step_time.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.harness import (
    MALLOC_ENV,
    MODEL_NAME,
    ROOT,
    STEP_VARIANTS,
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
    minilm_path,
    peak_step_memory,
    sst2_batches,
)
from benchmarks.inference import bench_inference, format_inference
from benchmarks.trainer_overhead import bench_end_to_end, format_end_to_end
from trainers.loop.optimizers import OPTIMIZER_IMPLS

PEFT_OF = {"lora": "peft_lora", "dora": "peft_dora"}
TARGETS = {  # issue 7: the goals, as (variant, reference, largest allowed ratio)
    "lora_vs_floor": ("lora", "floor", 1.10),
    "dora_vs_floor": ("dora", "floor", 1.20),
    "sora_vs_lora": ("sora", "lora", 1.05),
    "lora_vs_peft": ("lora", "peft_lora", 1.00),
    "dora_vs_peft": ("dora", "peft_dora", 1.00),
}


def bench_steps(
    base: nn.Module,
    batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
    names: Iterable[str] = STEP_VARIANTS,
    rounds: int = 5,
    steps_per_round: int = 3,
    warmup: int = 2,
    r: int = 8,
    lora_dropout: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clock: str = "wall",
    log: dict[str, Any] | None = None,
    optimizer_impl: str = "auto",
) -> tuple[dict[str, dict[str, Any]], dict[str, Variant]]:
    """Median step time, peak memory and trainable parameters of every step variant.

    ``batch`` may be a list of batches (e.g. real sentences of varying length): every variant then steps
    through the same batches in the same order, and the step times are of the cycle's steps. Peak memory
    is measured on the largest batch. ``log`` receives the rounds discarded for other load (see
    ``interleaved_times``).
    """
    batches = batch if isinstance(batch, list) else [batch]
    batch = max(batches, key=lambda b: b["input_ids"].numel())
    device = torch.device(device)
    variants = {
        n: build_variant(n, base, r=r, lora_alpha=2 * r, lora_dropout=lora_dropout, device=device, dtype=dtype,
                         optimizer_impl=optimizer_impl)
        for n in names
    }
    def cycling(variant: Variant) -> Callable[[], None]:
        position = [0]

        def step() -> None:
            variant.step(batches[position[0] % len(batches)])
            position[0] += 1

        return step

    runs = {n: cycling(v) for n, v in variants.items()}
    times = interleaved_times(runs, rounds, steps_per_round, warmup, device, clock, log=log)
    results = {}
    for name, variant in variants.items():
        results[name] = {
            "median_ms": 1e3 * statistics.median(times[name]),
            "min_ms": 1e3 * min(times[name]),
            "times_ms": [round(1e3 * t, 3) for t in times[name]],
            "peak_memory_mib": peak_step_memory(variant, batch, device) / 2**20,
            "trainable_params": variant.trainable,
            "wrapped_layers": len(variant.wrapped),
        }
    return results, variants


# -- report ------------------------------------------------------------------------------------
def summarize(
    steps: dict[str, dict[str, Any]],
    inference: dict[str, dict[str, float]] | None = None,
    end_to_end: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ratios to the floor and to PEFT (added to ``steps``), and which of the issue's targets are met."""
    for name, row in steps.items():
        if "floor" in steps:
            row["vs_floor"] = row["median_ms"] / steps["floor"]["median_ms"]
        peft = PEFT_OF.get(name)
        if peft in steps:
            row["vs_peft"] = row["median_ms"] / steps[peft]["median_ms"]
    targets = {}
    for key, (name, reference, limit) in TARGETS.items():
        if name in steps and reference in steps:
            ratio = steps[name]["median_ms"] / steps[reference]["median_ms"]
            targets[key] = {"ratio": ratio, "limit": limit, "met": ratio <= limit}
    for name, row in (inference or {}).items():
        if name.endswith("_merged"):
            targets[f"{name}_vs_plain"] = {"ratio": row["vs_plain"], "limit": 1.03, "met": row["vs_plain"] <= 1.03}
    if end_to_end and end_to_end.get("status") == "ok":
        overhead = end_to_end["trainer_overhead"]
        targets["trainer_overhead"] = {"ratio": overhead, "limit": 0.05, "met": overhead <= 0.05}
    return targets


def format_table(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    lines = [
        "| variant | median step (ms) | × floor | × PEFT | peak memory (MiB) | trainable params |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["steps"].items():
        vs_floor = f"{row['vs_floor']:.3f}" if "vs_floor" in row else "–"
        vs_peft = f"{row['vs_peft']:.3f}" if "vs_peft" in row else "–"
        lines.append(
            f"| {name} | {row['median_ms']:.1f} | {vs_floor} | {vs_peft} | {row['peak_memory_mib']:.1f} "
            f"| {row['trainable_params']:,} |"
        )
    if report.get("inference"):
        lines += ["", *format_inference(report["inference"])]
    if report.get("end_to_end"):
        lines += ["", *format_end_to_end(report["end_to_end"])]
    lines += ["", format_environment(report["environment"])]
    lines += ["", "| target | ratio | limit | met |", "| --- | ---: | ---: | :---: |"]
    for key, row in report["targets"].items():
        lines.append(f"| {key} | {row['ratio']:.3f} | {row['limit']:.2f} | {'yes' if row['met'] else 'NO'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--optimizer-impl", choices=tuple(OPTIMIZER_IMPLS), default="auto",
                        help="how AdamW runs (trainer.optimizer_impl): auto = fused where torch has it, as main.py")
    parser.add_argument("--lengths", choices=("fixed", "sst2"), default="fixed",
                        help="fixed: batch x seq-len random tokens; sst2: real SST-2 sentences of their own lengths\n"
                             "(8 length-grouped batches cycled through, at most seq-len tokens)")
    add_clock_arg(parser)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(STEP_VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end SST-2 comparison")
    parser.add_argument("--e2e-steps", type=int, default=16, help="training steps of each end-to-end run")
    parser.add_argument("--e2e-rounds", type=int, default=2, help="rounds of the three end-to-end runs")
    parser.add_argument("--trainer-override", action="append", default=[], help="extra override for main.py")
    add_malloc_arg(parser)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 step, 1 warm-up, no e2e")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "step_time.json")
    args = parser.parse_args(argv)
    args.command = command_line("step_time.py", argv)
    check_clock_arg(parser, args)
    if args.quick:
        args.rounds, args.steps_per_round, args.warmup, args.skip_e2e = 2, 1, 1, True
    return args


def run_benchmark(
    args: argparse.Namespace, base: nn.Module, model_name: str, tokenizer_path: Path | None = None
) -> dict[str, Any]:
    """Every part of the benchmark on ``base``; returns the report (also written to ``args.json``).

    The end-to-end part needs ``tokenizer_path`` (the tokenizer of ``base``) and is skipped without it.
    """
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    started = time.perf_counter()
    load_before = loadavg()
    if args.lengths == "sst2":
        from transformers import AutoTokenizer

        batches = sst2_batches(AutoTokenizer.from_pretrained(tokenizer_path or minilm_path()), args.batch_size, 8,
                               args.seq_len, device, num_labels=int(base.config.num_labels))
        batch = max(batches, key=lambda b: b["input_ids"].numel())
    else:
        batches = [make_batch(base, args.batch_size, args.seq_len, device)]
        batch = batches[0]
    timing: dict[str, Any] = {}
    steps, variants = bench_steps(
        base, batches, names, args.rounds, args.steps_per_round, args.warmup, args.r, args.lora_dropout, device, dtype,
        args.clock, log=timing.setdefault("steps", {}), optimizer_impl=args.optimizer_impl,
    )
    inference = None
    if not args.skip_inference:
        inference = bench_inference(
            base, variants, batch, args.rounds, args.steps_per_round, 1, device, dtype, args.clock,
            log=timing.setdefault("inference", {}),
        )
    del variants
    end_to_end = None
    if not args.skip_e2e and tokenizer_path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        end_to_end = bench_end_to_end(
            base, tokenizer, args.batch_size, args.seq_len, args.e2e_steps, args.r, args.e2e_rounds, device, dtype,
            args.trainer_override, MALLOC_ENV if args.malloc == "steady" else None,
        )
    report: dict[str, Any] = {
        "command": args.command,
        "settings": {
            "model": model_name,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lengths": args.lengths,
            "mean_tokens_per_example": sum(int(b["attention_mask"].sum()) for b in batches)
            / sum(b["input_ids"].shape[0] for b in batches),
            "r": args.r,
            "lora_alpha": 2 * args.r,
            "lora_dropout": args.lora_dropout,
            "targets": "all-linear, classifier trained in full (modules_to_save)",
            "optimizer": f"torch.optim.AdamW (defaults, lr 1e-4, {args.optimizer_impl}) on the trainable parameters",
            "rounds": args.rounds,
            "steps_per_round": args.steps_per_round,
            "warmup": args.warmup,
            "clock": args.clock,
            "malloc": args.malloc,
        },
        "environment": environment(device, dtype, args.threads),
        "steps": steps,
        "inference": inference,
        "end_to_end": end_to_end,
        "rounds_discarded_for_other_load": timing,
    }
    report["targets"] = summarize(steps, inference, end_to_end)
    report["environment"]["loadavg_before"] = load_before
    report["environment"]["loadavg_after"] = loadavg()
    report["wall_s"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    apply_malloc_arg(args)
    report = run_benchmark(args, load_minilm(), MODEL_NAME, tokenizer_path=minilm_path())
    print(format_table(report))
    print(f"\nwrote {args.json} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
