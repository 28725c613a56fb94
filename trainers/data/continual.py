"""Class-incremental data: a classification dataset's classes cut into tasks of ``classes_per_task``.

Class order: the dataset's natural label order (CLINC150: domain by domain as in ``domains.json``,
so 15 classes per task are its 10 domains) or, with ``order_seed``, a seeded random permutation.
Task t trains on the examples of its own classes; after task t the model is tested on the classes
of tasks 0..t. ``joint`` trains one task holding every class (the upper bound).

Text datasets reuse the readers of :mod:`trainers.data.readers`; image datasets (MNIST test images, CIFAR-100)
keep uint8 arrays and are resized / normalised per batch by :func:`make_image_collator`.
"""

from __future__ import annotations

import gzip
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers.core.errors import UserError, first_line
from trainers.data.readers import SUBSET_SEED, ClassificationData, load_raw, read_local_or_hub, subset, tokenize

# continual dataset name -> (underlying dataset, modality)
CONTINUAL_DATASETS: dict[str, tuple[str, str]] = {
    "clinc150_cl": ("clinc150", "text"),
    "banking77_cl": ("banking77", "text"),
    "mnist_cl": ("mnist_test", "image"),
    "cifar100_cl": ("cifar100", "image"),
}
LOSS_CLASSES = ("current", "seen")
MNIST_EVAL_FRACTION = 0.2  # MNIST has only its test split here: 20% of each class is held out for evaluation


def is_continual(dataset_cfg: Any) -> bool:
    """True for the class-incremental datasets (they run through :mod:`trainers.experiments.continual`)."""
    return dataset_cfg.get("name") in CONTINUAL_DATASETS


def check_continual_config(dataset: Any) -> None:
    """UserError (one line) on a bad continual dataset value."""
    if dataset.name not in CONTINUAL_DATASETS:
        raise UserError(f"unknown continual dataset {dataset.name!r} (choose from: {', '.join(CONTINUAL_DATASETS)})")
    if dataset.classes_per_task <= 0:
        raise UserError(f"dataset.classes_per_task must be > 0 (got {dataset.classes_per_task})")
    if dataset.num_tasks is not None and dataset.num_tasks <= 0:
        raise UserError(f"dataset.num_tasks must be null or > 0 (got {dataset.num_tasks})")
    for key in ("max_train_per_class", "max_eval_per_class"):
        if dataset[key] is not None and dataset[key] <= 0:
            raise UserError(f"dataset.{key} must be null or > 0 (got {dataset[key]})")
    if dataset.loss_classes not in LOSS_CLASSES:
        raise UserError(f"dataset.loss_classes must be current or seen (got {dataset.loss_classes!r})")


def task_split(num_classes: int, classes_per_task: int, num_tasks: int | None = None,
               order_seed: int | None = None) -> list[list[int]]:
    """Class ids of each task: the class order (natural, or ``random.Random(order_seed)``-shuffled) cut into
    consecutive chunks of ``classes_per_task``; the first ``num_tasks`` of them (all when None)."""
    if num_classes % classes_per_task:
        raise UserError(f"dataset.classes_per_task={classes_per_task} does not divide the {num_classes} classes")
    order = list(range(num_classes))
    if order_seed is not None:
        random.Random(order_seed).shuffle(order)
    tasks = [order[i:i + classes_per_task] for i in range(0, num_classes, classes_per_task)]
    if num_tasks is not None:
        if num_tasks > len(tasks):
            raise UserError(f"dataset.num_tasks={num_tasks}, but {num_classes} classes make only {len(tasks)} tasks "
                            f"of {classes_per_task}")
        tasks = tasks[:num_tasks]
    return tasks


def cap_per_class(examples: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """Keep the first ``limit`` examples of every class (a fixed random subset: rows are shuffled with
    SUBSET_SEED first, original order kept)."""
    if limit is None:
        return examples
    order = list(range(len(examples)))
    random.Random(SUBSET_SEED).shuffle(order)
    taken: dict[int, int] = {}
    keep = []
    for i in order:
        label = examples[i]["labels"]
        if taken.get(label, 0) < limit:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return [examples[i] for i in sorted(keep)]


@dataclass
class ContinualData:
    """All examples of the used classes, and the task split; ``modality`` is text or image."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str]
    tasks: list[list[int]]
    modality: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def seen(self, task: int) -> list[int]:
        """Classes of tasks 0..task."""
        return [c for t in self.tasks[: task + 1] for c in t]

    def task_data(self, task: int) -> ClassificationData:
        """Train and evaluation examples of task ``task``'s classes (the Trainer's evaluation covers only the
        new task; the runner tests the earlier ones with the same Trainer afterwards)."""
        own = set(self.tasks[task])
        return ClassificationData([ex for ex in self.train if ex["labels"] in own], self.task_eval(task),
                                  self.label_names)

    def task_eval(self, task: int) -> list[dict[str, Any]]:
        """Evaluation examples of task ``task``'s classes."""
        own = set(self.tasks[task])
        return [ex for ex in self.eval if ex["labels"] in own]

    def joint(self) -> ContinualData:
        """One task holding every class (joint training, the upper bound)."""
        return ContinualData(self.train, self.eval, self.label_names, [self.seen(len(self.tasks) - 1)], self.modality)


# --------------------------------------------------------------------------------------------- images
def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=offset)


def _read_mnist_test(folder: Path) -> tuple[list, list, list[str]]:
    """MNIST's test images split per class into train / eval (MNIST_EVAL_FRACTION held out, fixed seed)."""
    files = [folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise UserError(f"missing data file(s) for dataset mnist_cl: {', '.join(missing)} "
                        f"(check data_root / DATA_ROOT)")
    images = _read_idx(files[0], 16).reshape(-1, 28, 28)
    labels = _read_idx(files[1], 8).astype(int)
    rng = random.Random(SUBSET_SEED)
    train, evals = [], []
    for c in range(10):
        idx = [int(i) for i in np.flatnonzero(labels == c)]
        rng.shuffle(idx)
        cut = int(round(len(idx) * MNIST_EVAL_FRACTION))
        evals += [(images[i], c) for i in sorted(idx[:cut])]
        train += [(images[i], c) for i in sorted(idx[cut:])]
    return train, evals, [str(c) for c in range(10)]


# the only globals a CIFAR-100 python file needs: numpy arrays and dtypes (and bytes under protocol 2)
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _DataUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: any other global (what a crafted pickle needs to run code) is
    refused before it is imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy"):
            import importlib

            for candidate in (module, module.replace("numpy.core", "numpy._core"),
                              module.replace("numpy._core", "numpy.core")):
                try:
                    return getattr(importlib.import_module(candidate), name)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(module, name)


def _load_data_pickle(path: Path) -> Any:
    """A CIFAR python file through :class:`_DataUnpickler`; UserError naming the file otherwise."""
    try:
        with path.open("rb") as fh:
            return _DataUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"{path}: not a CIFAR-100 python file ({first_line(exc)}); only plain data and numpy arrays "
                        f"are read from data pickles") from None


def _read_cifar100(folder: Path) -> tuple[list, list, list[str]]:
    """``<data_root>/cifar100/cifar-100-python/{train,test,meta}`` (the official python pickles)."""
    base = folder / "cifar-100-python"
    files = [base / "train", base / "test", base / "meta"]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise UserError(f"missing data file(s) for dataset cifar100_cl: {', '.join(missing)} (unpack "
                        f"cifar-100-python.tar.gz there, or set data_root=null to use the Hub)")

    meta = _load_data_pickle(files[2])
    names = meta.get("fine_label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == 100 and all(isinstance(n, str) for n in names)):
        raise UserError(f"{files[2]}: expected CIFAR-100's meta (a dict whose fine_label_names lists 100 names)")

    def rows(path: Path) -> list:
        d = _load_data_pickle(path)
        try:
            images = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = [int(y) for y in d["fine_labels"]]
            bad = next((i for i, y in enumerate(labels) if not 0 <= y < len(names)), None)
            if bad is not None:
                raise ValueError(f"fine_labels[{bad}] = {labels[bad]} is not a class index 0..99")
            return list(zip(images, labels, strict=True))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: {first_line(exc)}; expected CIFAR-100's python split (data: N x 3072 uint8, "
                            f"fine_labels: N class indices)") from None

    return rows(files[0]), rows(files[1]), list(names)


def _hub_cifar100() -> tuple[list, list, list[str]]:
    from datasets import load_dataset

    ds = load_dataset("uoft-cs/cifar100")
    names = ds["train"].features["fine_label"].names

    def rows(split: Any) -> list:
        return [(np.asarray(img.convert("RGB"), np.uint8), y) for img, y in zip(split["img"], split["fine_label"],
                                                                                 strict=True)]

    return rows(ds["train"]), rows(ds["test"]), list(names)


IMAGE_READERS: dict[str, tuple[Callable[[Path], tuple], Callable[[], tuple] | None]] = {
    "mnist_test": (_read_mnist_test, None),
    "cifar100": (_read_cifar100, _hub_cifar100),
}


def _load_images(source: str, data_root: str | None) -> tuple[list, list, list[str]]:
    return read_local_or_hub(source, data_root, *IMAGE_READERS[source])


Collator = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


def make_image_collator(image_size: int, num_channels: int) -> Collator:
    """uint8 images (H, W) or (H, W, C) -> ``pixel_values`` (B, num_channels, image_size, image_size):
    bilinear resize, x / 255, then (x - 0.5) / 0.5 as ViT's image processor does."""

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = []
        for f in features:
            x = torch.as_tensor(np.asarray(f["image"]), dtype=torch.float32)
            x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
            if x.shape[0] != num_channels:
                x = x.mean(0, keepdim=True).expand(num_channels, -1, -1) if num_channels in (1, 3) else x
            images.append(x)
        pixels = torch.stack(images) / 255.0
        if pixels.shape[-1] != image_size or pixels.shape[-2] != image_size:
            pixels = torch.nn.functional.interpolate(pixels, size=(image_size, image_size), mode="bilinear",
                                                     align_corners=False, antialias=True)
        return {"pixel_values": (pixels - 0.5) / 0.5,
                "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long)}

    return collate


# --------------------------------------------------------------------------------------------- building
def build_continual_data(dataset_cfg: Any, data_root: str | None, tokenizer: Any = None) -> ContinualData:
    """Read, split into tasks, cut (max_*_samples, max_*_per_class) and tokenise (text) a continual dataset.

    Only the classes of the used tasks are kept; labels keep their dataset ids (the head is full-size).
    """
    source, modality = CONTINUAL_DATASETS[dataset_cfg.name]
    if modality == "text":
        raw = load_raw(source, data_root)
        names = raw.label_names
        train_rows, eval_rows = raw.train, raw.eval
    else:
        train_rows, eval_rows, names = _load_images(source, data_root)
    tasks = task_split(len(names), dataset_cfg.classes_per_task, dataset_cfg.num_tasks, dataset_cfg.order_seed)
    used = {c for t in tasks for c in t}
    train_rows = subset([r for r in train_rows if r[1] in used], dataset_cfg.max_train_samples)
    eval_rows = subset([r for r in eval_rows if r[1] in used], dataset_cfg.max_eval_samples)
    if modality == "text":
        if tokenizer is None:
            raise ValueError("text datasets need a tokenizer")
        train = tokenize(train_rows, tokenizer, dataset_cfg.max_seq_length)
        evals = tokenize(eval_rows, tokenizer, dataset_cfg.max_seq_length)
    else:
        train = [{"image": img, "labels": int(y)} for img, y in train_rows]
        evals = [{"image": img, "labels": int(y)} for img, y in eval_rows]
    train = cap_per_class(train, dataset_cfg.max_train_per_class)
    evals = cap_per_class(evals, dataset_cfg.max_eval_per_class)
    if modality == "text":
        evals.sort(key=lambda ex: len(ex["input_ids"]))
    data = ContinualData(train, evals, list(names), tasks, modality)
    for t in range(len(tasks)):
        if not any(ex["labels"] in set(tasks[t]) for ex in train) or not data.task_eval(t):
            raise UserError(f"dataset {dataset_cfg.name}: task {t} has no train or eval examples "
                            f"(max_*_samples too small?)")
    return data
