"""Training-step time of LoRA on MiniLM: fp32 eager against torch.compile and bf16 autocast (and both).

    python benchmarks/compile_bf16.py                      # batch 32 x 64 tokens, r=8, all linears, CPU
    python benchmarks/compile_bf16.py --steps 2 --rounds 1 # a quick check that every variant runs

One step is forward, backward and a fused AdamW step (``trainer.optimizer_impl=auto``) on the embedded
all-MiniLM-L6-v2 with LoRA on every linear layer, as ``trainer.compile`` / ``trainer.precision=bf16`` run it:

    eager          fp32, no compilation (the default run)
    compile        torch.compile of the model (the first calls compile: they are the warm-up, not timed)
    bf16           bf16 autocast around forward and loss, fp32 master weights
    compile_bf16   both

Variants are timed round by round with a rotating order (``harness.interleaved_times``); the table gives the
median per step and the ratio to eager. The numbers mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as a script (python benchmarks/compile_bf16.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from adapters import wrap_linears
from benchmarks.harness import add_clock_arg, check_clock_arg, interleaved_times, load_minilm, make_batch
from trainers.loop.optimizers import build_adamw

VARIANTS = ("eager", "compile", "bf16", "compile_bf16")


def make_step(variant: str, batch: dict[str, torch.Tensor], r: int, dropout: float) -> Callable[[], None]:
    """One training step of LoRA (r, lora_alpha = 2r, all linears) on a fresh MiniLM, run as ``variant``."""
    model = load_minilm()
    torch.manual_seed(1)
    wrap_linears(model, "all-linear", r=r, lora_alpha=2 * r, lora_dropout=dropout, modules_to_save=["classifier"])
    model.train()
    optimizer = build_adamw([{"params": [p for p in model.parameters() if p.requires_grad]}], "auto", lr=1e-4)
    forward = torch.compile(model) if variant.startswith("compile") else model

    def step() -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in variant else contextlib.nullcontext()
        with autocast:
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def format_table(times: dict[str, list[float]]) -> str:
    """Median ms per step and the ratio to eager, one line per variant."""
    eager = statistics.median(times["eager"])
    lines = [f"{'variant':<14} {'ms/step':>9} {'vs eager':>9}"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"{name:<14} {median * 1e3:>9.1f} {median / eager:>8.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round (default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of all variants (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--r", type=int, default=8, help="adapter rank; lora_alpha = 2r")
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    add_clock_arg(parser)
    args = parser.parse_args(argv)
    args.device = "cpu"
    check_clock_arg(parser, args)
    return args


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Time the variants and print the table; returns seconds per step of every variant."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    variants = ["eager", *[v for v in args.variants if v != "eager"]]  # eager is the reference
    batch = make_batch(load_minilm(), args.batch_size, args.seq_len, device)
    steps = {name: make_step(name, batch, args.r, args.dropout) for name in variants}
    times = interleaved_times(steps, args.rounds, args.steps, args.warmup, device, args.clock)
    print(f"LoRA r={args.r} on MiniLM, batch {args.batch_size} x {args.seq_len} tokens, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.steps} steps")
    print(format_table(times))
    return times


if __name__ == "__main__":
    main()
