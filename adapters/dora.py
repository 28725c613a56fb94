"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation, computed as PEFT does.

    V = W + s B A                  (out, in), formed only for large batches (``merging_pays``)
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

The forward is one fused autograd node (``_DoraLinearFn``). Without dropout (or in eval) the branch
is accumulated into z = W x + s B A x by the same GEMM, y = (m / n) z + b by one ``addcmul``, and
the backward computes dm = Σ_tokens gy ⊙ z / n and the rest as LoRA does with gy (m / n) in place
of gy, with no second W x and no (tokens, in) add for the input gradient. With dropout it computes
y = (x - x_d) Wᵀ + b + (m / n) ⊙ z with z = W x_d + s B A x_d: the same two GEMMs as PEFT's formula and
no other pass over (tokens, out) tensors but one. From about 768 tokens on (``merging_pays``), z is computed
with the merged W + s B A, whose rows also give n. With a differentiable norm the node also returns
dn = -dm ⊙ m / n, and autograd carries it through the rank-sized norm formula. A trainable base layer
with dropout, and autocast, take the plain composition of modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .base import LowRankLinear, linear_2d, rank_reduce_tokens, rank_times_tokens


def _accumulation(t: torch.Tensor) -> torch.Tensor:
    """The tensor in a dtype fit for summing squares: half precisions go up to float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def merging_pays(tokens: int, weight: torch.Tensor) -> bool:
    """Whether a step computes with the merged weight W' = W + s B A rather than with a separate branch.

    The separate branch costs two rank-sized passes over the activations (the branch accumulated into z, dh A
    into the input gradient), about tokens x (in + out) x r multiply-adds, and the row norm one (r, in) x (in, out)
    product; the merged weight costs out x in x r to form, in the forward and again in the backward, and gives the
    norm from one pass over W'. Measured on 2 CPU threads the merged weight wins from about
    tokens x (in + out) >= 4 in out on: 768 tokens for a 384 x 384 layer, 1,229 for 384 x 1536.
    """
    out_features, in_features = weight.shape
    return tokens * (in_features + out_features) >= 4 * in_features * out_features


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W' = W + s B A, the (out, in) weight whose row norm DoRA divides by."""
    return torch.addmm(weight, lora_B, lora_A, alpha=scaling)


def row_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W_i||^2 per output row, summed in float32 for half precisions."""
    return _accumulation(weight).pow(2).sum(dim=1)


def merged_row_norm(merged: torch.Tensor) -> torch.Tensor:
    """n = ||W'||_row of a merged weight W' = W + s B A; the same arithmetic as ``DoraLinear.weight_norm`` while
    B is zero (W' is then W exactly), so a fresh layer stays an exact no-op."""
    return row_sq_norm(merged).sqrt().to(merged.dtype)


def _scale_grads(ctx, gy: torch.Tensor, z: torch.Tensor, mag_scale: torch.Tensor, norm: torch.Tensor):
    """(db, dm, dn) of y = c ⊙ z + (...) + b with c = m / n: db = Σ_tokens gy, dm = Σ_tokens gy ⊙ z / n and
    dn = -dm ⊙ c, each None where ``ctx`` needs no gradient."""
    need_bias, need_m, need_n = (ctx.needs_input_grad[i] for i in (3, 6, 7))
    grad_bias = gy.sum(0) if need_bias else None
    grad_m = grad_n = None
    if need_m or need_n:
        grad_mn = torch.linalg.vecdot(gy, z, dim=0).div_(norm)
        grad_m = grad_mn if need_m else None
        grad_n = -grad_mn * mag_scale if need_n else None
    return grad_bias, grad_m, grad_n


class _DoraLinearFn(torch.autograd.Function):
    """y = (m / n) ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b in one node; n is the row norm (an input like any other).

    Backward, with z = x Wᵀ + s (x Aᵀ) Bᵀ (saved), c = m / n and gz = gy ⊙ c:
        dm = Σ_tokens gy ⊙ z / n,  dn = -dm ⊙ m / n,  db = Σ_tokens gy,  dB = s gzᵀ h,  dh = s gz B,
        dA = dhᵀ x,  dx = gz W + dh A (accumulated in place).
    dn is returned only when n carries a graph (``detach_norm=False``); the caller's norm formula then
    passes it on to A and B.
    gz is never formed when W is smaller than gy: gz W = gy (c ⊙ W), gz B = gy (c ⊙ B) and
    gzᵀ h = c ⊙ (gyᵀ h) scale (out, in) and (out, r) tensors instead of a (tokens, out) one.

    With a dropped input x_d (``x_branch``, PEFT's dropout semantics) the node computes
        y = (x - x_d) Wᵀ + b + c ⊙ z,   z = x_d Wᵀ + s (x_d Aᵀ) Bᵀ,
    which is W x + b + (c - 1) ⊙ W x_d + c ⊙ s B A x_d with two GEMMs as PEFT's, and in the backward
        dx = gy W,  dx_d = gy (c ⊙ W - W) + dh A,  dm, dn, dB, dA as above with x_d in place of x
    (a trainable base layer takes the plain path instead).

    With ``merged`` (the caller's ``merging_pays``) z = x Wᵀ and dx = gz W' use the merged W' = W + s B A, formed
    in the forward and again in the backward: no rank-sized pass for z or dx, and a ``norm`` of None is then
    taken from W' itself (``merged_row_norm``, the detached norm); without it ``norm`` must be given.
    Rank-sized products are computed with r leading, as in ``base._LowRankLinearFn``.
    """

    @staticmethod
    def forward(ctx, x, x_branch, weight, bias, lora_A, lora_B, magnitude, norm, scaling, merged, grad_enabled):
        x2 = x.reshape(-1, x.shape[-1])
        xb2 = x2 if x_branch is None else x_branch.reshape(-1, x_branch.shape[-1])
        if merged:
            w_merged = merged_weight(weight, lora_A, lora_B, scaling)
            norm = merged_row_norm(w_merged) if norm is None else norm
            z = torch.mm(xb2, w_merged.t())
            h_t = rank_times_tokens(lora_A, xb2) if grad_enabled and ctx.needs_input_grad[5] else None  # for dB
        else:
            h_t = rank_times_tokens(lora_A, xb2)
            z = torch.mm(xb2, weight.t())
            z.addmm_(h_t.t(), lora_B.t(), alpha=scaling)
        mag_scale = magnitude / norm
        if x_branch is None:
            y = z * mag_scale if bias is None else torch.addcmul(bias, z, mag_scale)
        else:
            y = linear_2d(x2 - xb2, weight, bias).addcmul_(z, mag_scale)
        ctx.save_for_backward(x2 if x_branch is None else None,  # with x_d, only gy W and x_d are needed
                              None if x_branch is None else xb2, h_t, z, weight, lora_A, lora_B, mag_scale, norm)
        ctx.scaling = scaling
        ctx.merged = merged
        ctx.shapes = (x.shape, None if x_branch is None else x_branch.shape)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2, xb2, h_t, z, weight, lora_A, lora_B, mag_scale, norm = ctx.saved_tensors
        need_x, need_xb, need_w, _, need_a, need_b, *_ = ctx.needs_input_grad
        if xb2 is not None:
            return _DoraLinearFn._dropped_backward(ctx, grad_out, xb2, h_t, z, weight, lora_A, lora_B, mag_scale,
                                                   norm)
        x_shape = ctx.shapes[0]
        s = ctx.scaling
        gy = grad_out.reshape(-1, weight.shape[0])
        grad_x = grad_w = grad_a = grad_b = None
        grad_bias, grad_m, grad_n = _scale_grads(ctx, gy, z, mag_scale, norm)
        col = mag_scale.unsqueeze(1)
        fold = gy.shape[0] > weight.shape[1]  # scaling W (out, in) is cheaper than scaling gy (tokens, out)
        gz = gy if fold else gy * mag_scale
        if need_b:
            grad_b = rank_reduce_tokens(h_t, gz).mul_(s).t()
            grad_b = (grad_b * col if fold else grad_b).contiguous()
        if need_a or (need_x and not ctx.merged):
            dh_t = rank_times_tokens((lora_B * col if fold else lora_B).t(), gz).mul_(s)
            if need_a:
                grad_a = rank_reduce_tokens(dh_t, x2)
        if need_x:
            if ctx.merged:  # gz W' carries dh A
                w_merged = merged_weight(weight, lora_A, lora_B, s)
                grad_x = torch.mm(gz, w_merged.mul_(col) if fold else w_merged)
            else:
                grad_x = torch.mm(gz, weight * col if fold else weight)
                grad_x.addmm_(dh_t.t(), lora_A)
            grad_x = grad_x.view(x_shape)
        if need_w:  # a frozen base never needs this; kept so the node is right for any inputs
            grad_w = torch.mm(gz.t(), x2)
            grad_w = grad_w * col if fold else grad_w
        return grad_x, None, grad_w, grad_bias, grad_a, grad_b, grad_m, grad_n, None, None, None

    @staticmethod
    def _dropped_backward(ctx, grad_out, xb2, h_t, z, weight, lora_A, lora_B, mag_scale, norm):
        """The backward with a separate dropped input x_d (``xb2``); c is folded into W and B throughout."""
        need_x, need_xb, need_w, _, need_a, need_b, *_ = ctx.needs_input_grad
        if need_w:
            raise RuntimeError("the fused DoRA node with dropout does not train the base weight")
        x_shape, xb_shape = ctx.shapes
        s = ctx.scaling
        gy = grad_out.reshape(-1, weight.shape[0])
        grad_x = grad_xb = grad_a = grad_b = None
        grad_bias, grad_m, grad_n = _scale_grads(ctx, gy, z, mag_scale, norm)
        col = mag_scale.unsqueeze(1)
        if need_b:
            grad_b = rank_reduce_tokens(h_t, gy).t().mul_(col * s).contiguous()
        if need_a or (need_xb and not ctx.merged):
            dh_t = rank_times_tokens((lora_B * col).t(), gy).mul_(s)
            if need_a:
                grad_a = rank_reduce_tokens(dh_t, xb2)
        if need_x:
            grad_x = torch.mm(gy, weight).view(x_shape)
        if need_xb:
            if ctx.merged:  # gy (c ⊙ W' - W) carries dh A
                w_merged = merged_weight(weight, lora_A, lora_B, s)
                grad_xb = torch.mm(gy, w_merged.mul_(col).sub_(weight))
            else:
                grad_xb = torch.mm(gy, weight * (col - 1.0)).addmm_(dh_t.t(), lora_A)
            grad_xb = grad_xb.view(xb_shape)
        return grad_x, grad_xb, None, grad_bias, grad_a, grad_b, grad_m, grad_n, None, None, None


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
                self._weight_sq_norm = row_sq_norm(weight)
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
        base = self.base_layer
        if self.use_fused(x) and (self.dropout_is_identity or not base.weight.requires_grad):
            x_d = None if self.dropout_is_identity else self.dropout_input(x)
            merged = merging_pays(x.numel() // x.shape[-1], base.weight)
            # merging, the node takes the detached norm from the merged weight itself
            norm = None if merged and self.detach_norm else self.forward_norm()
            return _DoraLinearFn.apply(
                x, x_d, base.weight, base.bias, self.lora_A, self.lora_B, self.magnitude, norm, self.scaling, merged,
                torch.is_grad_enabled(),
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
