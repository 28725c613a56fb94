"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation, computed as PEFT does.

    V = W + s B A                  (out, in), never materialised in the forward
    n = ||V||_row                  per output row (dim=1), detached from the graph (paper, sec. 4.3)
    y = (m / n) * (W x + s B A x) + b

The magnitude m (out,) starts at n, so the layer starts as an exact no-op. With dropout active,
PEFT applies the magnitude correction to the dropped input, and so do we:

    y = W x + b + (m / n - 1) * W x_d + (m / n) * s B A x_d,     x_d = dropout(x)

The row norm is computed without B A, from quantities of rank size (W is frozen):

    ||V_i||^2 = ||W_i||^2 + 2 s <W_i, (B A)_i> + s^2 ||(B A)_i||^2
              = ||W_i||^2 + 2 s (B * (W A.T))_i.sum() + s^2 (B (A A.T) * B)_i.sum()

||W_i||^2 is cached and recomputed only when the base weight changes (tracked by its version).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LowRankLinear


def _accumulation(t: torch.Tensor) -> torch.Tensor:
    """The tensor in a dtype fit for summing squares: half precisions go up to float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class DoraLinear(LowRankLinear):
    """y = (m / n) (W x + s B A x) + b with n = ||W + s B A||_row detached."""

    adapter_name = "dora"

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        self._weight_sq_norm: torch.Tensor | None = None
        self._weight_version: tuple[int, int, torch.dtype] | None = None
        self._merge_scale: torch.Tensor | None = None
        self.magnitude = nn.Parameter(self.weight_norm().clone())

    def _base_row_sq_norm(self) -> torch.Tensor:
        weight = self.base_layer.weight
        key = (id(weight), weight._version, weight.dtype)
        if self._weight_sq_norm is None or self._weight_version != key:
            with torch.no_grad():
                self._weight_sq_norm = _accumulation(weight).pow(2).sum(dim=1)
            self._weight_version = key
        return self._weight_sq_norm

    def weight_norm(self) -> torch.Tensor:
        """n = ||W + s B A|| per output row, detached, without forming B A."""
        with torch.no_grad():
            weight = self.base_layer.weight
            a, b, s = _accumulation(self.lora_A), _accumulation(self.lora_B), self.scaling
            cross = (b * F.linear(_accumulation(weight), a)).sum(dim=1)  # <W_i, (B A)_i>
            lora_sq = ((b @ (a @ a.T)) * b).sum(dim=1)  # ||(B A)_i||^2
            sq_norm = self._base_row_sq_norm() + 2.0 * s * cross + (s * s) * lora_sq
            return sq_norm.clamp_min(0.0).sqrt().to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        mag_scale = self.magnitude / self.weight_norm()
        x_d = self.lora_dropout(x)
        lora = F.linear(F.linear(x_d, self.lora_A) * self.scaling, self.lora_B)
        bias = self.base_layer.bias
        if self.dropout_is_identity:
            # (m/n) (W x + s B A x) + b, reusing the base output instead of a second W x
            if bias is None:
                return mag_scale * (result + lora)
            return mag_scale * (result - bias + lora) + bias
        return result + (mag_scale - 1) * F.linear(x_d, self.base_layer.weight) + mag_scale * lora

    def delta_weight(self) -> torch.Tensor:
        """W' - W where W' = (m / n) (W + s B A) is the merged weight."""
        weight = self.base_layer.weight
        mag_scale = (self.magnitude / self.weight_norm()).unsqueeze(1)
        return mag_scale * (weight + (self.lora_B @ self.lora_A) * self.scaling) - weight

    def merge(self) -> None:
        if self.merged:
            return
        with torch.no_grad():
            mag_scale = (self.magnitude / self.weight_norm()).unsqueeze(1)
            weight = self.base_layer.weight
            weight.copy_(mag_scale * (weight + (self.lora_B @ self.lora_A) * self.scaling))
            self._merge_scale = mag_scale
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            weight = self.base_layer.weight
            restored = weight / self._merge_scale - (self.lora_B @ self.lora_A) * self.scaling
            weight.copy_(restored)
            self._merge_scale = None
        self.merged = False
