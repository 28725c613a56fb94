"""Whole runs: ``python main.py`` against ``transformers.Trainer`` + PEFT on the same data, settings and seed.

    python benchmarks/end_to_end.py                          # LoRA and DoRA (both sides), SoRA (ours), 8,000 SST-2
    python benchmarks/end_to_end.py --samples 2000 --rounds 1 --methods lora

Both sides train the embedded all-MiniLM-L6-v2 on the same SST-2 subset (``dataset.max_train_samples``'s
subset, tokenised by the same code, max 64 tokens) with main.py's defaults: r 8, lora_alpha 16, dropout
0.1 on all linear layers with the classifier trained in full, batch 32, AdamW lr 1e-3 (betas 0.9/0.98,
weight decay 0.01), linear warmup 10 %, clipping at 1.0, length-grouped batches, one epoch, checkpoints
every 100 steps (2 kept), evaluation on the 872 dev sentences at the end, seed 42 (`--seed`). Each run is a fresh
process; the runs are interleaved (ours, theirs, ours, theirs, ...) so machine noise falls on both alike.

Reported per run: train samples/s (examples over the wall time from the first step's start to the last
step's end, measured the same way on both sides by a step clock), the process's whole wall time (imports,
loading, training, evaluation), its peak resident memory (VmHWM) and the dev accuracy. The table gives
medians over rounds and our ratio to theirs. Writes a JSON report (``--json``).
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

if not __package__:  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import ROOT, command_line, data_root, environment, format_environment, loadavg, minilm_path
from benchmarks.trainer_clock import StepClock

SETTINGS = {"batch_size": 32, "eval_batch_size": 128, "lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 0.01,
            "warmup_ratio": 0.1, "max_grad_norm": 1.0, "r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
            "max_seq_length": 64, "seed": 42, "save_steps": 100, "save_total_limit": 2}
THEIRS = ("lora", "dora")  # methods transformers.Trainer + PEFT can run


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------------------------- their side
def run_hf_trainer(method: str, samples: int, out: Path) -> dict[str, Any]:
    """Train with transformers.Trainer + PEFT in this process; returns the measurements."""
    import numpy as np
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from trainers.data.readers import load_raw, subset, tokenize

    set_seed(SETTINGS["seed"])
    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    raw = load_raw("sst2", str(data_root()))
    train = tokenize(subset(raw.train, samples), tokenizer, SETTINGS["max_seq_length"])
    dev = tokenize(raw.eval, tokenizer, SETTINGS["max_seq_length"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["lora_alpha"], lora_dropout=SETTINGS["lora_dropout"],
                        target_modules="all-linear", modules_to_save=["classifier"], use_dora=method == "dora")
    model = get_peft_model(model, config)

    class StepClock(TrainerCallback):
        begin: list[float] = []
        end: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            StepClock.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            StepClock.end.append(time.perf_counter())

    def accuracy(prediction: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    import inspect

    accepted = inspect.signature(TrainingArguments.__init__).parameters  # the names changed in transformers 5
    version_specific = ({"warmup_ratio": SETTINGS["warmup_ratio"]} if "warmup_ratio" in accepted
                        else {"warmup_steps": SETTINGS["warmup_ratio"]})  # a float < 1 is a ratio there
    version_specific.update({"group_by_length": True} if "group_by_length" in accepted
                            else {"train_sampling_strategy": "group_by_length"})
    args = TrainingArguments(
        output_dir=str(out), **version_specific, per_device_train_batch_size=SETTINGS["batch_size"],
        per_device_eval_batch_size=SETTINGS["eval_batch_size"], learning_rate=SETTINGS["lr"],
        adam_beta1=SETTINGS["betas"][0], adam_beta2=SETTINGS["betas"][1], weight_decay=SETTINGS["weight_decay"],
        lr_scheduler_type="linear", max_grad_norm=SETTINGS["max_grad_norm"],
        num_train_epochs=1, seed=SETTINGS["seed"], logging_steps=20,
        save_strategy="steps", save_steps=SETTINGS["save_steps"], save_total_limit=SETTINGS["save_total_limit"],
        eval_strategy="no", report_to=[], dataloader_num_workers=0, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
                      callbacks=[StepClock()])
    trainer.train()
    metrics = trainer.evaluate()
    return {"train_s": StepClock.end[-1] - StepClock.begin[0], "steps": len(StepClock.end),
            "dev_accuracy": metrics["eval_accuracy"], "peak_rss_mib": peak_rss_mib()}


# --------------------------------------------------------------------------------------------- our side
def run_ours(method: str, samples: int, out: Path) -> dict[str, Any]:
    """``python main.py`` with the same settings in a subprocess; its step clock gives the training time."""
    clock = out / "steps.json"
    cmd = [sys.executable, str(ROOT / "main.py"), f"adapter={method}", f"dataset.max_train_samples={samples}",
           f"seed={SETTINGS['seed']}", f"hydra.run.dir={out / 'run'}",
           "+trainer.callbacks.bench_clock._target_=benchmarks.end_to_end.PeakClock",
           f"+trainer.callbacks.bench_clock.path={clock}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"main.py failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    times = json.loads(clock.read_text())
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    return {"train_s": times["end"][-1] - times["begin"][0], "steps": len(times["end"]),
            "dev_accuracy": metrics["eval_accuracy"], "peak_rss_mib": times["peak_rss_mib"]}


class PeakClock(StepClock):
    """The step clock plus the process's peak memory at the end of the run (given to main.py as a callback)."""

    def on_run_end(self, trainer: Any, result: dict[str, Any]) -> None:
        data = json.loads(self.path.read_text())
        self.path.write_text(json.dumps({**data, "peak_rss_mib": peak_rss_mib()}))


# --------------------------------------------------------------------------------------------- driver
def one_run(side: str, method: str, samples: int) -> dict[str, Any]:
    """A fresh process for one side's run; its wall time is measured from here."""
    with tempfile.TemporaryDirectory(prefix=f"e2e_{side}_{method}_") as folder:
        out = Path(folder)
        start = time.perf_counter()
        if side == "ours":
            result = run_ours(method, samples, out)
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_hf", method, "--samples", str(samples),
                   "--seed", str(SETTINGS["seed"]), "--_out", str(out)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                raise RuntimeError(f"Trainer + PEFT failed: {proc.stderr.strip().splitlines()[-3:]}")
            result = json.loads((out / "result.json").read_text())
        result["wall_s"] = time.perf_counter() - start
    result["train_samples_per_s"] = samples / result["train_s"]
    return result


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    keys = ("train_samples_per_s", "wall_s", "peak_rss_mib", "dev_accuracy")
    return {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}


def format_report(report: dict[str, Any]) -> str:
    environment_line = format_environment({**report["environment"], "loadavg_before": report["load_before"],
                                           "loadavg_after": report["load_after"]})
    lines = [environment_line, "", "| run | train samples/s | wall (s) | peak RSS (MiB) | dev accuracy | "
             "ours / theirs (samples/s) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    summary = report["summary"]
    for name, row in summary.items():
        side, method = name.split(":")
        other = summary.get(f"theirs:{method}") if side == "ours" else None
        ratio = f"{row['train_samples_per_s'] / other['train_samples_per_s']:.2f}x" if other else "–"
        label = f"{'main.py' if side == 'ours' else 'Trainer + PEFT'} {method}"
        lines.append(f"| {label} | {row['train_samples_per_s']:.1f} | {row['wall_s']:.1f} | {row['peak_rss_mib']:.0f} "
                     f"| {row['dev_accuracy']:.4f} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8000, help="SST-2 training examples (1 epoch)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians are reported)")
    parser.add_argument("--methods", default="lora,dora,sora", help="comma-separated; sora runs on our side only")
    parser.add_argument("--seed", type=int, default=SETTINGS["seed"], help="the seed of both sides (main.py's is 42)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "end_to_end.json")
    parser.add_argument("--_hf", help=argparse.SUPPRESS)
    parser.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    SETTINGS["seed"] = args.seed
    if args._hf:  # the child process of one Trainer + PEFT run
        result = run_hf_trainer(args._hf, args.samples, args._out)
        (args._out / "result.json").write_text(json.dumps(result))
        return None
    import torch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs: dict[str, list[dict[str, Any]]] = {}
    load_before = loadavg()
    for round_index in range(args.rounds):
        for method in methods:
            for side in ("ours", "theirs") if method in THEIRS else ("ours",):
                result = one_run(side, method, args.samples)
                runs.setdefault(f"{side}:{method}", []).append(result)
                print(f"round {round_index + 1}/{args.rounds} {side} {method}: "
                      f"{result['train_samples_per_s']:.1f} samples/s, wall {result['wall_s']:.1f} s, "
                      f"dev accuracy {result['dev_accuracy']:.4f}", flush=True)
    report = {"command": command_line("benchmarks/end_to_end.py", argv), "settings": SETTINGS,
              "samples": args.samples, "rounds": args.rounds,
              "environment": environment(torch.device("cpu"), torch.float32, torch.get_num_threads()),
              "load_before": load_before, "load_after": loadavg(), "runs": runs, "summary": summarize(runs)}
    print(format_report(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
