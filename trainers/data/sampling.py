"""Deterministic, resumable, process-sharded sampling and the DataLoader built on it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """Per-epoch permutation seeded by ``seed + epoch``, sharded over processes, resumable mid-epoch.

    Every process gets ``ceil(n / world_size)`` indices (the permutation is padded by wrapping around),
    so all processes run the same number of batches. ``set_epoch(epoch, start)`` skips the first
    ``start`` indices of this process's shard, which is how a resumed run continues the data order.

    With ``lengths`` and ``batch_size`` given, batches are grouped by length (as transformers'
    ``group_by_length``): the permutation is cut into mega-batches of 50 global batches, each sorted
    by length and cut into global batches (``batch_size x world_size``), whose order is then shuffled.
    Batches then hold examples of similar length, so far less padding is computed.
    """

    MEGA_BATCHES = 50

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 lengths: list[int] | None = None, batch_size: int | None = None) -> None:
        if lengths is not None and (batch_size is None or len(lengths) != num_samples):
            raise ValueError("length grouping needs one length per sample and a batch_size")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.lengths = lengths
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0

    @property
    def shard_size(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def _group_by_length(self, order: list[int], gen: torch.Generator) -> list[int]:
        assert self.lengths is not None and self.batch_size is not None
        global_batch = self.batch_size * self.world_size
        mega = global_batch * self.MEGA_BATCHES
        batches: list[list[int]] = []
        for i in range(0, len(order), mega):
            chunk = sorted(order[i:i + mega], key=lambda j: -self.lengths[j])
            batches.extend(chunk[k:k + global_batch] for k in range(0, len(chunk), global_batch))
        # a short global batch stays last, so every process's batches line up
        full = [b for b in batches if len(b) == global_batch]
        short = [b for b in batches if len(b) != global_batch]
        perm = torch.randperm(len(full), generator=gen).tolist()
        return [j for b in [full[p] for p in perm] + short for j in b]

    def shard(self) -> list[int]:
        """This process's indices for the current epoch (before skipping ``start``)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
            if self.lengths is not None:
                order = self._group_by_length(order, gen)
        else:
            order = list(range(self.num_samples))
        total = self.shard_size * self.world_size
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start:])

    def __len__(self) -> int:
        return max(self.shard_size - self.start, 0)


class ShardSampler(Sampler[int]):
    """Evaluation sampler: process ``rank`` takes indices ``rank, rank + world_size, ...`` (no padding)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(examples: list[dict[str, Any]], sampler: Sampler[int], batch_size: int,
                collate: Callable[..., Any], num_workers: int, seed: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader with its own generator, so creating it never touches the global RNG (exact resume).
    ``pin_memory``: page-locked batches, so copies to a GPU can be non-blocking."""
    return DataLoader(examples, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory)
