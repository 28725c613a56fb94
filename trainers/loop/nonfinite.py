"""The non-finite guard: a NaN/inf loss, gradient norm, weight or evaluation loss never passes as a result.

``trainer.on_nonfinite`` decides what a bad optimizer step does: ``stop`` (default) raises
:class:`~trainers.core.errors.NonFiniteError` before the optimizers touch the weights; ``skip_step`` drops
the step's update (gradients zeroed, optimizers not stepped, the schedule and the data position advance as
for any step) at most ``trainer.max_skipped_steps`` times, then stops as ``stop`` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

POLICIES = ("stop", "skip_step")


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """The global L2 norm ``sqrt(sum_p ||grad_p||^2)`` of the parameters' gradients (None: no gradients).

    The same quantity ``torch.nn.utils.clip_grad_norm_`` returns, computed without clipping."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))


def all_finite(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """A device-side boolean: every element of every tensor is finite (no host sync)."""
    flags = [torch.isfinite(v).all() for v in values]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def nonfinite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (one host sync)."""
    names = list(tensors)
    if not names:
        return []
    ok = torch.stack([torch.isfinite(tensors[n].detach()).all().cpu() for n in names]).tolist()
    return [name for name, good in zip(names, ok, strict=True) if not good]


def nonfinite_losses(metrics: Mapping[str, object]) -> list[str]:
    """``key=value`` for every evaluation loss (a key ending in ``loss``) that is NaN or infinite."""
    return [f"{k}={v}" for k, v in metrics.items()
            if k.endswith("loss") and isinstance(v, float) and not math.isfinite(v)]
