"""End-to-end SST-2 training throughput of the trainer (``main.py``) against plain training loops.

    python benchmarks/trainer_overhead.py               # MiniLM LoRA r=8, batch 32 x 64 tokens, 16 steps, 2 rounds
    python benchmarks/trainer_overhead.py --steps 8 --rounds 1 --json e2e.json

All three runs (``main.py``, a bare loop with our LoRA, a bare loop with PEFT's) train LoRA on all linear
layers plus the head with main.py's default optimisation settings on SST-2 sentences packed to full
``--seq-len`` examples, so every step does the same work; each reports samples/s of its best round.
The trainer's own step timestamps (``trainer_clock.StepClock``) split its time into the step and
what it adds around it (next batch, log lines, checkpoints). Needs DATA_ROOT (or ../shared/data).
``step_time.py`` runs this part too (``--e2e-steps``, ``--e2e-rounds``, ``--skip-e2e`` there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/trainer_overhead.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.harness import (
    MALLOC_ENV,
    MODEL_NAME,
    ROOT,
    OtherLoad,
    add_malloc_arg,
    add_model_args,
    apply_malloc_arg,
    build_variant,
    command_line,
    data_root,
    environment,
    format_environment,
    load_minilm,
    loadavg,
    minilm_path,
    read_sst2,
    sync,
)

# The settings of `python main.py` (conf/trainer/default.yaml, conf/adapter/lora.yaml) that the plain
# loops copy; they are also passed to main.py explicitly so both sides run the same configuration.
E2E = {"lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 0.01, "warmup_ratio": 0.1, "max_grad_norm": 1.0,
       "lora_dropout": 0.1}


def write_packed_sst2(
    source: Path, target: Path, tokenizer: Any, count: int, seq_len: int
) -> tuple[list[str], list[int]]:
    """SST-2 training sentences joined in file order until each example has at least ``seq_len`` tokens.

    Every batch is then exactly (batch, seq_len) after truncation, whatever order or length grouping
    a loop uses, so the trainer and the plain loops do the same work per step. Writes
    ``target/sst2/{train,dev}.tsv`` (dev is copied) for main.py and returns the examples.
    """
    sentences, labels = read_sst2(source / "sst2" / "train.tsv")
    packed: list[str] = []
    packed_labels: list[int] = []
    parts: list[str] = []
    tokens = 0
    for start in range(0, len(sentences), 4096):  # tokenize only as much as is needed
        chunk = sentences[start:start + 4096]
        for offset, ids in enumerate(tokenizer(chunk, add_special_tokens=False)["input_ids"]):
            parts.append(chunk[offset].strip())
            tokens += len(ids)
            if tokens >= seq_len:
                packed.append(" ".join(parts))
                packed_labels.append(labels[start + offset])  # any label will do for speed
                parts, tokens = [], 0
        if len(packed) >= count:
            break
    packed, packed_labels = packed[:count], packed_labels[:count]
    (target / "sst2").mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{text}\t{label}\n" for text, label in zip(packed, packed_labels, strict=True))
    (target / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + rows, encoding="utf-8")
    (target / "sst2" / "dev.tsv").write_text((source / "sst2" / "dev.tsv").read_text(encoding="utf-8"))
    return packed, packed_labels


def plain_loop_samples_per_second(
    model: nn.Module,
    tokenizer: Any,
    sentences: list[str],
    labels: list[int],
    batch_size: int,
    seq_len: int,
    steps: int,
    device: torch.device,
    seed: int = 0,
) -> float:
    """Samples/s of a bare training loop with main.py's optimisation settings (steps 2..N; 1 warms up).

    Each step tokenizes a shuffled batch, runs forward and backward, clips the gradient norm, steps
    AdamW and the linear warm-up schedule: what any training loop must do, and nothing else.
    """
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=E2E["lr"], betas=E2E["betas"], weight_decay=E2E["weight_decay"])
    schedule = get_linear_schedule_with_warmup(optimizer, int(E2E["warmup_ratio"] * steps), steps)
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    start = 0.0
    for step in range(steps):
        if step == 1:
            sync(device)
            start = time.perf_counter()
        chunk = order[(step * batch_size) % len(order):][:batch_size]
        enc = tokenizer([sentences[i] for i in chunk], truncation=True, max_length=seq_len, padding=True,
                        return_tensors="pt")
        batch = {k: v.to(device) for k, v in enc.items()}
        loss = model(**batch, labels=torch.tensor([labels[i] for i in chunk], device=device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, E2E["max_grad_norm"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return (steps - 1) * batch_size / (time.perf_counter() - start)


def run_trainer(
    overrides: list[str], env: dict[str, str] | None = None, timeout: float = 1200
) -> tuple[dict[str, Any] | None, str]:
    """Run ``python main.py <overrides>`` with a ``StepClock`` callback in a fresh run folder (environment ``env``).

    Returns (the clock's step timestamps plus main.py's metrics.json, "ok") or (None, why it failed).
    """
    if not (ROOT / "main.py").is_file() or not (ROOT / "trainers" / "loop" / "hooks.py").is_file():
        return None, "main.py / trainers/ are not there (the trainer has not landed)"
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as run_dir:
        clock = Path(run_dir) / "steps.json"
        cmd = [sys.executable, "main.py", *overrides, f"hydra.run.dir={run_dir}/run",
               "+trainer.callbacks.bench_clock._target_=benchmarks.trainer_clock.StepClock",
               f"+trainer.callbacks.bench_clock.path={clock}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        metrics_file = Path(run_dir) / "run" / "metrics.json"
        if proc.returncode != 0 or not metrics_file.is_file() or not clock.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return None, f"main.py failed (exit {proc.returncode}): {tail[0]}"
        return {**json.loads(clock.read_text()), "metrics": json.loads(metrics_file.read_text())}, "ok"


def split_trainer_time(
    clock: dict[str, Any], batch_size: int, log_every: int, save_every: int, default_log: int, default_save: int
) -> dict[str, float]:
    """Per-step time of the trainer split into the step (forward, backward, optimizer) and the rest.

    From the timestamps of steps 2..N: ``step_s`` (median of step end - begin) and the gaps between
    one step's end and the next one's begin (the next batch, plus a log line after every
    ``log_every``-th step and a checkpoint after every ``save_every``-th). The costs of one log line
    and one checkpoint come from the gaps that hold them; ``overhead`` is the trainer's share of
    the time per step at its default intervals (``default_log``, ``default_save``).
    """
    begin, end, steps = clock["begin"], clock["end"], clock["steps"]
    step_s = statistics.median(e - b for b, e in zip(begin[1:], end[1:], strict=True))
    gaps = {steps[i]: begin[i + 1] - end[i] for i in range(len(begin) - 1)}  # after step k, before k + 1
    plain = [g for k, g in gaps.items() if k % log_every and k % save_every]
    logged = [g for k, g in gaps.items() if not k % log_every and k % save_every]
    saved = [g for k, g in gaps.items() if not k % save_every]
    data_s = statistics.median(plain) if plain else 0.0
    log_s = max(statistics.median(logged) - data_s, 0.0) if logged else 0.0
    save_s = max(statistics.median(saved) - data_s - log_s, 0.0) if saved else 0.0
    around = data_s + log_s / default_log + save_s / default_save
    wall = (end[-1] - end[0]) / (len(end) - 1)  # steps 2..N with everything between them
    return {
        "step_s": step_s,
        "data_s": data_s,
        "log_line_s": log_s,
        "checkpoint_s": save_s,
        "overhead": around / (step_s + around),
        "loop_samples_per_s": batch_size / wall,
    }


def bench_end_to_end(
    base: nn.Module,
    tokenizer: Any,
    batch_size: int,
    seq_len: int,
    steps: int,
    r: int,
    rounds: int,
    device: torch.device,
    dtype: torch.dtype,
    trainer_overrides: list[str],
    trainer_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """SST-2 training samples/s of the trainer (main.py, LoRA) and of plain loops with PEFT and with ours.

    All three train LoRA r on all linear layers plus the head with main.py's default optimisation
    settings (``E2E``) on the same packed SST-2 examples, so every step is (batch, seq_len). They
    run ``rounds`` times in a rotating order; each reports its best round (other load only ever
    slows a run down). The trainer's overhead comes from its own step timestamps (``StepClock``).
    """
    source = data_root()
    if source is None:
        return {"status": "skipped", "reason": "SST-2 not found: set DATA_ROOT to the shared data folder"}
    from omegaconf import OmegaConf

    env = {**os.environ, **(trainer_env or {})}

    defaults = OmegaConf.load(ROOT / "conf" / "trainer" / "default.yaml") if (ROOT / "conf").is_dir() else {}
    default_log, default_save = int(defaults.get("log_every_steps", 20)), int(defaults.get("save_every_steps", 100))
    log_every, save_every = 4, 8  # so that a short run holds log lines and a checkpoint to time
    result: dict[str, Any] = {"batch_size": batch_size, "seq_len": seq_len, "steps": steps, "rounds": rounds, **E2E}
    runs: dict[str, list[float]] = {"plain_loop_peft_lora": [], "plain_loop_lora": [], "trainer": []}
    other_load: dict[str, list[float | None]] = {}
    splits: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench_sst2_") as packed_root:
        count = batch_size * steps
        sentences, labels = write_packed_sst2(source, Path(packed_root), tokenizer, count, seq_len)
        overrides = [
            "model=minilm", "dataset=sst2", "adapter=lora", "schedule=constant",
            f"adapter.r={r}", f"adapter.lora_alpha={2 * r}", f"adapter.lora_dropout={E2E['lora_dropout']}",
            "adapter.target_modules=all-linear", f"data_root={packed_root}",
            f"dataset.max_train_samples={count}", "dataset.max_eval_samples=64", f"dataset.max_seq_length={seq_len}",
            f"trainer.max_steps={steps}", f"trainer.batch_size={batch_size}", f"trainer.base_lr={E2E['lr']}",
            f"trainer.weight_decay={E2E['weight_decay']}", f"trainer.warmup_ratio={E2E['warmup_ratio']}",
            f"trainer.max_grad_norm={E2E['max_grad_norm']}", "trainer.precision=fp32",
            f"trainer.log_every_steps={log_every}", f"trainer.save_every_steps={save_every}",
            *trainer_overrides,
        ]
        result["trainer_command"] = "python main.py " + " ".join(o for o in overrides if "data_root" not in o)
        names = list(runs)
        load = OtherLoad()
        for rnd in range(rounds):
            for name in names[rnd % 3:] + names[:rnd % 3]:
                load.start()
                if name == "trainer":
                    clock, why = run_trainer(overrides, env)
                    if clock is None:
                        result.update(status="trainer not measured", reason=why)
                        continue
                    split = split_trainer_time(clock, batch_size, log_every, save_every, default_log, default_save)
                    splits.append(split)
                    runs[name].append(split["loop_samples_per_s"])
                else:
                    variant = build_variant(name.removeprefix("plain_loop_"), base, r=r, lora_alpha=2 * r,
                                            lora_dropout=E2E["lora_dropout"], device=device, dtype=dtype)
                    runs[name].append(plain_loop_samples_per_second(
                        variant.model, tokenizer, sentences, labels, batch_size, seq_len, steps, device))
                    del variant
                share = load.share()
                other_load.setdefault(name, []).append(None if share is None else round(share, 3))
    for name, values in runs.items():
        result[f"{name}_samples_per_s"] = max(values) if values else None
        result[f"{name}_rounds"] = values
    result["other_load_per_run"] = other_load
    if not splits:
        return result
    best = max(splits, key=lambda split: split["loop_samples_per_s"])
    result["trainer_split"] = best
    result["trainer_split_intervals"] = {"log_every_steps": default_log, "save_every_steps": default_save}
    result["trainer_overhead"] = best["overhead"]
    result["trainer_vs_peft_loop"] = result["trainer_samples_per_s"] / result["plain_loop_peft_lora_samples_per_s"]
    result["trainer_vs_lora_loop"] = result["trainer_samples_per_s"] / result["plain_loop_lora_samples_per_s"]
    result["status"] = "ok"
    return result


def format_end_to_end(e2e: dict[str, Any]) -> list[str]:
    """The end-to-end table, the trainer's time split and why a part was not measured (Markdown lines)."""
    blocks: list[list[str]] = []
    if e2e.get("status") != "skipped":
        table = ["| end to end, SST-2 (LoRA, dropout 0.1) | samples/s | × PEFT loop |", "| --- | ---: | ---: |"]
        peft = e2e.get("plain_loop_peft_lora_samples_per_s")
        for key in ("trainer", "plain_loop_lora", "plain_loop_peft_lora"):
            value = e2e.get(f"{key}_samples_per_s")
            ratio = f"{value / peft:.3f}" if value and peft else "–"
            table.append(f"| {key} | {value:.1f} | {ratio} |" if value else f"| {key} | – | – |")
        blocks.append(table)
        split = e2e.get("trainer_split")
        if split:
            intervals = e2e["trainer_split_intervals"]
            blocks.append([f"trainer per step: {1e3 * split['step_s']:.0f} ms forward/backward/optimizer, "
                           f"{1e3 * split['data_s']:.1f} ms next batch, {1e3 * split['log_line_s']:.1f} ms per log "
                           f"line, {1e3 * split['checkpoint_s']:.0f} ms per checkpoint -> overhead "
                           f"{100 * split['overhead']:.2f}% at a log line every {intervals['log_every_steps']} and a "
                           f"checkpoint every {intervals['save_every_steps']} steps"])
    if e2e.get("status") != "ok":
        blocks.append([f"end to end: {e2e.get('status')} ({e2e.get('reason')})"])
    lines = blocks[0] if blocks else []
    for block in blocks[1:]:
        lines += ["", *block]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--steps", type=int, default=16, help="training steps of each run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three runs")
    parser.add_argument("--trainer-override", action="append", default=[], help="extra override for main.py")
    add_malloc_arg(parser)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.command = command_line("trainer_overhead.py", argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    apply_malloc_arg(args)
    base = load_minilm()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    started, load_before = time.perf_counter(), loadavg()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    end_to_end = bench_end_to_end(
        base, tokenizer, args.batch_size, args.seq_len, args.steps, args.r, args.rounds, device, dtype,
        args.trainer_override, MALLOC_ENV if args.malloc == "steady" else None,
    )
    report: dict[str, Any] = {
        "command": args.command,
        "settings": {"model": MODEL_NAME, "r": args.r, "lora_alpha": 2 * args.r, "malloc": args.malloc},
        "environment": {**environment(device, dtype, args.threads), "loadavg_before": load_before,
                        "loadavg_after": loadavg()},
        "end_to_end": end_to_end,
        "wall_s": time.perf_counter() - started,
    }
    print("\n".join([*format_end_to_end(end_to_end), "", format_environment(report["environment"])]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
