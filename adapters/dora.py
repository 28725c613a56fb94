"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation, computed as PEFT does.

    V = W + s B A                  (out, in), never materialised in the forward
    n = ||V||_row                  per output row (dim=1)
    y = (m / n) * (W x + s B A x) + b

``detach_norm=True`` (the default, as PEFT and the official code: paper, sec. 4.3) treats n as a constant
in the backward; ``detach_norm=False`` is the fully differentiable norm of the seed's lab (the paper's
ablation): gradients then also flow from n into A and B.

The magnitude m (out,) starts at n, so the layer starts as an exact no-op. With dropout active,
PEFT applies the magnitude correction to the dropped input, and so do we:

    y = W x + b + (m / n - 1) * W x_d + (m / n) * s B A x_d,     x_d = dropout(x)

The row norm is computed without B A, from quantities of rank size (W is frozen):

    ||V_i||^2 = ||W_i||^2 + 2 s <W_i, (B A)_i> + s^2 ||(B A)_i||^2
              = ||W_i||^2 + 2 s (B * (W A.T))_i.sum() + s^2 (B (A A.T) * B)_i.sum()

||W_i||^2 is cached and recomputed only when the base weight changes (tracked by its version);
the rest is one (out, in) x (in, r) product and a few (out, r) ones.

Without dropout (or in eval) the forward is one fused autograd node (``_DoraLinearFn``): the branch
is accumulated into z = W x + s B A x by the same GEMM, y = (m / n) z + b by one ``addcmul``, and
the backward computes dm = Σ_tokens gy ⊙ z / n and the rest as LoRA does with gy (m / n) in place
of gy, with no second W x and no (tokens, in) add for the input gradient. With a differentiable norm
the node also returns dn = -dm ⊙ m / n, and autograd carries it through the rank-sized norm formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .base import LowRankLinear, rank_reduce_tokens, rank_times_tokens


def _accumulation(t: torch.Tensor) -> torch.Tensor:
    """The tensor in a dtype fit for summing squares: half precisions go up to float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _DoraLinearFn(torch.autograd.Function):
    """y = (m / n) ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b in one node; n is the row norm (an input like any other).

    Backward, with z = x Wᵀ + s (x Aᵀ) Bᵀ (saved), c = m / n and gz = gy ⊙ c:
        dm = Σ_tokens gy ⊙ z / n,  dn = -dm ⊙ m / n,  db = Σ_tokens gy,  dB = s gzᵀ h,  dh = s gz B,
        dA = dhᵀ x,  dx = gz W + dh A (accumulated in place).
    dn is returned only when n carries a graph (``detach_norm=False``); the caller's norm formula then
    passes it on to A and B.
    gz is never formed when W is smaller than gy: gz W = gy (c ⊙ W), gz B = gy (c ⊙ B) and
    gzᵀ h = c ⊙ (gyᵀ h) scale (out, in) and (out, r) tensors instead of a (tokens, out) one.
    Rank-sized products are computed with r leading, as in ``base._LowRankLinearFn``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        h_t = rank_times_tokens(lora_A, x2)
        z = torch.mm(x2, weight.t())
        z.addmm_(h_t.t(), lora_B.t(), alpha=scaling)
        mag_scale = magnitude / norm
        y = z * mag_scale if bias is None else torch.addcmul(bias, z, mag_scale)
        ctx.save_for_backward(x2, h_t, z, weight, lora_A, lora_B, mag_scale, norm)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2, h_t, z, weight, lora_A, lora_B, mag_scale, norm = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_m, need_n, _ = ctx.needs_input_grad
        s = ctx.scaling
        gy = grad_out.reshape(-1, weight.shape[0])
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_m = grad_n = None
        if need_m or need_n:
            grad_mn = (gy * z).sum(0).div_(norm)  # dL/dm; dL/dn = -dL/dm * m / n = -dL/dm * c
            grad_m = grad_mn if need_m else None
            grad_n = -grad_mn * mag_scale if need_n else None
        if need_bias:
            grad_bias = gy.sum(0)
        col = mag_scale.unsqueeze(1)
        fold = gy.shape[0] > weight.shape[1]  # scaling W (out, in) is cheaper than scaling gy (tokens, out)
        gz = gy if fold else gy * mag_scale
        if need_b:
            grad_b = rank_reduce_tokens(h_t, gz).mul_(s).t()
            grad_b = (grad_b * col if fold else grad_b).contiguous()
        if need_a or need_x:
            dh_t = rank_times_tokens((lora_B * col if fold else lora_B).t(), gz).mul_(s)
            if need_a:
                grad_a = rank_reduce_tokens(dh_t, x2)
            if need_x:
                grad_x = torch.mm(gz, weight * col if fold else weight)
                grad_x.addmm_(dh_t.t(), lora_A)
                grad_x = grad_x.view(ctx.x_shape)
        if need_w:  # a frozen base never needs this; kept so the node is right for any inputs
            grad_w = torch.mm(gz.t(), x2)
            grad_w = grad_w * col if fold else grad_w
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, grad_n, None


class DoraLinear(LowRankLinear):
    """y = (m / n) (W x + s B A x) + b with n = ||W + s B A||_row, detached unless ``detach_norm=False``."""

    adapter_name = "dora"
    peft_use_dora = True

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        detach_norm: bool = True,
    ) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        self.detach_norm = bool(detach_norm)
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

    def _row_norm(self) -> torch.Tensor:
        """n = ||W + s B A|| per output row without forming B A (differentiable in A and B; W is frozen).

        ||V_i||^2 = ||W_i||^2 + Σ_j B_ij C_ji with C = 2 s A Wᵀ + s^2 (A Aᵀ) Bᵀ of shape (r, out):
        one (r, in) x (in, out) product (r leading, the fast way round for BLAS), one ``addmm`` and
        a column-wise dot product.
        """
        weight = self.base_layer.weight
        a, b, s = _accumulation(self.lora_A), _accumulation(self.lora_B), self.scaling
        cross_t = torch.addmm(torch.mm(a, _accumulation(weight.detach()).t()), a @ a.T, b.t(), beta=2.0 * s,
                              alpha=s * s)
        sq_norm = self._base_row_sq_norm() + torch.linalg.vecdot(b.t(), cross_t, dim=0)
        return sq_norm.clamp_min(0.0).sqrt().to(weight.dtype)

    def weight_norm(self) -> torch.Tensor:
        """n = ||W + s B A|| per output row, detached, without forming B A."""
        with torch.no_grad():
            return self._row_norm()

    def forward_norm(self) -> torch.Tensor:
        """The n the forward divides by: detached (``detach_norm``) or carrying the graph to A and B."""
        return self.weight_norm() if self.detach_norm else self._row_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.dropout_is_identity and self.use_fused(x):
            base = self.base_layer
            return _DoraLinearFn.apply(
                x, base.weight, base.bias, self.lora_A, self.lora_B, self.magnitude, self.forward_norm(), self.scaling
            )
        result = self.base_layer(x)
        mag_scale = self.magnitude / self.forward_norm()
        x_d = self.dropout_input(x)
        lora = F.linear(F.linear(x_d, self.lora_A) * self.scaling, self.lora_B)
        bias = self.base_layer.bias
        if self.dropout_is_identity:
            # (m/n) (W x + s B A x) + b, reusing the base output instead of a second W x
            if bias is None:
                return mag_scale * (result + lora)
            return mag_scale * (result - bias + lora) + bias
        return result + (mag_scale - 1) * F.linear(x_d, self.base_layer.weight) + mag_scale * lora

    def peft_tensors(self) -> tuple[int, dict[str, torch.Tensor]]:
        rank, tensors = super().peft_tensors()
        return rank, {**tensors, "lora_magnitude_vector": self.magnitude.detach()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, detach_norm={self.detach_norm}"

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
