"""Weight decomposition W = m * d (DoRA, Liu et al., 2024), per output row as DoRA and PEFT define it.

For a weight of shape (out, in): m_i = ||W_i|| (the L2 norm of row i) and d_i = W_i / m_i (a unit row).
Between a weight W_0 and a later W_t of the same layer (the paper's fig. 2 / sec. 3):

    dM = mean_i |m_t,i - m_0,i|                 (magnitude change)
    dD = mean_i (1 - cos(W_t,i, W_0,i))         (direction change)
"""

from __future__ import annotations

import torch
from torch import nn

from .base import adapter_layers


def magnitude_direction(weight: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, d)`` with m (out,) the row norms and d = W / m[:, None] the unit-norm rows (``eps`` added to m
    in the division only, for rows that may be zero)."""
    magnitude = torch.linalg.vector_norm(weight, dim=1)
    return magnitude, weight / (magnitude + eps).unsqueeze(1)


def decomposition_change(initial: torch.Tensor, current: torch.Tensor) -> tuple[float, float]:
    """``(dM, dD)`` of ``current`` against ``initial`` (same (out, in) shape), computed in float64."""
    if initial.shape != current.shape or initial.dim() != 2:
        raise ValueError(f"need two weights of one (out, in) shape, got {tuple(initial.shape)} and "
                         f"{tuple(current.shape)}")
    w0, wt = initial.detach().double(), current.detach().double()
    m0, mt = torch.linalg.vector_norm(w0, dim=1), torch.linalg.vector_norm(wt, dim=1)
    delta_m = (mt - m0).abs().mean()
    # 1 - cos(a, b) = ||a/|a| - b/|b|||^2 / 2: no cancellation for small angles (exactly 0 for equal rows);
    # a zero row has no direction: its cos counts as 0
    nonzero = (m0 > 0) & (mt > 0)
    unit0, unitt = w0 / m0.clamp_min(1e-300).unsqueeze(1), wt / mt.clamp_min(1e-300).unsqueeze(1)
    one_minus_cos = torch.where(nonzero, (unitt - unit0).pow(2).sum(dim=1) / 2, torch.ones_like(m0))
    return float(delta_m), float(one_minus_cos.mean())


def weight_decomposition(model: nn.Module) -> list[dict[str, float | str]]:
    """``{"layer", "dM", "dD"}`` for every adapter layer on an ``nn.Linear``, of its merged weight W_t against its
    initial weight W_0 (the pretrained W: every adapter starts as a no-op), in model order."""
    rows: list[dict[str, float | str]] = []
    for name, layer in adapter_layers(model).items():
        if isinstance(layer.base_layer, nn.Linear):
            delta_m, delta_d = decomposition_change(layer.initial_weight(), layer.merged_weight())
            rows.append({"layer": name, "dM": delta_m, "dD": delta_d})
    return rows
