"""The shared base of every adapter layer.

An adapter layer wraps an existing ``nn.Linear`` (``base_layer``) in place, freezes it, and adds a
trainable low-rank branch. Shapes follow PEFT: ``lora_A`` is (r, in_features), ``lora_B`` is
(out_features, r), and the branch is scaled by ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rsLoRA). The branch always computes ``(dropout(x) @ A.T) @ B.T`` and never the (out, in) product B @ A.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .dropout import SharedInputDropout


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) for rank-stabilised LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def validate_hyperparameters(r: int, lora_alpha: float, lora_dropout: float) -> None:
    """Raise ValueError with one clear line for out-of-range adapter hyperparameters."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


def autocast_active(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (the fused paths then step aside for the plain ones)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _token_chunks(tokens: int, device: torch.device) -> int:
    """How many token blocks to split a rank-sized product into: one per CPU thread, else 1.

    BLAS parallelises GEMMs with r (= 8, say) output rows poorly: on a multi-threaded CPU a batched
    GEMM over blocks of tokens runs them 1.3-1.6x faster. On GPUs (and one thread) there is nothing to gain.
    """
    if device.type != "cpu":
        return 1
    chunks = torch.get_num_threads()
    return chunks if chunks > 1 and tokens % chunks == 0 and tokens >= 256 * chunks else 1


def rank_times_tokens(left: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """left @ tokensᵀ for left (r, k) and tokens (n, k): the (r, n) product, r leading."""
    n, k = tokens.shape
    chunks = _token_chunks(n, tokens.device)
    if chunks == 1 or not tokens.is_contiguous():
        return torch.mm(left, tokens.t())
    blocks = torch.bmm(left.expand(chunks, *left.shape), tokens.view(chunks, n // chunks, k).transpose(1, 2))
    return blocks.transpose(0, 1).reshape(left.shape[0], n)  # (r, chunks, n / chunks), a copy of r x n


def rank_reduce_tokens(left_t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """left_t @ tokens for left_t (r, n) and tokens (n, k): the (r, k) product summed over the n tokens."""
    n, k = tokens.shape
    chunks = _token_chunks(n, tokens.device)
    if chunks == 1 or not (tokens.is_contiguous() and left_t.is_contiguous()):
        return torch.mm(left_t, tokens)
    left_blocks = left_t.view(left_t.shape[0], chunks, n // chunks).transpose(0, 1)
    return torch.bmm(left_blocks, tokens.view(chunks, n // chunks, k)).sum(0)


def linear_2d(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b for a 2-D x."""
    return torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())


class _LowRankLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s ((x_d Aᵀ) ⊙ g) Bᵀ in one node; x_d is the branch input (None: x itself), g optional.

    Backward, with hᵀ = A x_dᵀ and qᵀ = Bᵀ gyᵀ, both (r, tokens):
        dB = s gyᵀ (h ⊙ g),  dg = s Σ_tokens q ⊙ h,  dh = s q ⊙ g,  dA = dhᵀ x_d,
        dx = gy W (+ dh A when x_d is x, accumulated in place),  dx_d = dh A,
        dW = gyᵀ x and db = Σ_tokens gy only where the base layer is trainable.

    The rank-sized products are computed with r as their leading dimension (hᵀ, qᵀ, dhᵀ): BLAS runs
    these skinny GEMMs several times faster that way round than as (tokens, r) results, and on a
    multi-threaded CPU as a batched GEMM over token blocks (``rank_times_tokens``, ``rank_reduce_tokens``).
    """

    @staticmethod
    def forward(ctx, x, x_branch, weight, bias, lora_A, lora_B, gate, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        xb2 = x2 if x_branch is None else x_branch.reshape(-1, x_branch.shape[-1])
        h_t = rank_times_tokens(lora_A, xb2)
        hg_t = h_t if gate is None else h_t * gate.unsqueeze(1)
        y = linear_2d(x2, weight, bias)
        y.addmm_(hg_t.t(), lora_B.t(), alpha=scaling)
        # with a separate branch input, x itself is needed only for the gradient of a trainable W
        keep_x = x_branch is None or ctx.needs_input_grad[2]
        ctx.save_for_backward(x2 if keep_x else None, None if x_branch is None else xb2, h_t, weight, lora_A, lora_B,
                              gate)
        ctx.scaling = scaling
        ctx.shapes = (x.shape, None if x_branch is None else x_branch.shape)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2, xb2, h_t, weight, lora_A, lora_B, gate = ctx.saved_tensors
        need_x, need_xb, need_w, need_bias, need_a, need_b, need_g, _ = ctx.needs_input_grad
        x_shape, xb_shape = ctx.shapes
        s = ctx.scaling
        gy = grad_out.reshape(-1, weight.shape[0])
        separate = xb2 is not None
        xb2 = xb2 if separate else x2
        grad_x = grad_xb = grad_w = grad_bias = grad_a = grad_b = grad_g = None
        if need_b:
            hg_t = h_t if gate is None else h_t * gate.unsqueeze(1)
            grad_b = rank_reduce_tokens(hg_t, gy).mul_(s).t().contiguous()
        need_dh = need_a or need_g or (need_xb if separate else need_x)
        if need_dh:
            q_t = rank_times_tokens(lora_B.t(), gy)
            if need_g:
                grad_g = (q_t * h_t).sum(1).mul_(s)
            dh_t = q_t.mul_(s) if gate is None else q_t.mul_((gate * s).unsqueeze(1))
            if need_a:
                grad_a = rank_reduce_tokens(dh_t, xb2)
        if need_x:
            grad_x = torch.mm(gy, weight)
            if need_dh and not separate:
                grad_x.addmm_(dh_t.t(), lora_A)
            grad_x = grad_x.view(x_shape)
        if need_xb and separate:
            grad_xb = torch.mm(dh_t.t(), lora_A).view(xb_shape)
        if need_w:
            grad_w = torch.mm(gy.t(), x2)
        if need_bias:
            grad_bias = gy.sum(0)
        return grad_x, grad_xb, grad_w, grad_bias, grad_a, grad_b, grad_g, None


def adapter_layers(model: nn.Module, kind: type[AdapterLayer] | None = None) -> dict[str, AdapterLayer]:
    """Name -> layer for every adapter layer (of the given kind) in ``model``."""
    kind = kind or AdapterLayer
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def low_rank_linear(
    x: torch.Tensor,
    base_layer: nn.Linear,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    gate: torch.Tensor | None = None,
    x_branch: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x Wᵀ + b + s ((x_d Aᵀ) ⊙ g) Bᵀ as one fused autograd node (x_d = ``x_branch``, default x)."""
    if x_branch is x:
        x_branch = None
    return _LowRankLinearFn.apply(x, x_branch, base_layer.weight, base_layer.bias, lora_A, lora_B, gate, scaling)


class SharedAdapterState(nn.Module):
    """Adapter tensors shared by many layers of one model (e.g. SD-LoRA's per-task magnitudes).

    Registered once on the model (not inside any layer), so optimizers and state dicts see them once;
    ``adapter_state_dict`` always includes them. Its forward is the identity, so registering it on an
    ``nn.Sequential`` (which calls every child in turn) changes nothing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class AdapterLayer(nn.Module):
    """Base class: holds the frozen base layer, the rank, the scaling and the input dropout.

    Subclasses create their trainable tensors in ``__init__`` and implement ``forward``,
    ``delta_weight`` (the dense update the layer adds to W) and, where it exists, exact merging.
    """

    adapter_name: str = "base"
    trains_base: bool = False           # wrap_linears keeps the wrapped layer's own parameters trainable (full)
    mergeable: bool = True              # merge_model folds it into W (False: refused, e.g. a stochastic gate)
    peft_use_dora: bool | None = False  # PEFT's use_dora flag for this layer (None: fits either, e.g. embeddings)

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        validate_hyperparameters(r, lora_alpha, lora_dropout)
        self.base_layer = base_layer
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(self.lora_alpha, r, use_rslora)
        self.lora_dropout_p = float(lora_dropout)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.dropout_cache: SharedInputDropout | None = None  # set by install_dropout_sharing ("shared" mode)
        self.merged = False
        self.fused = True  # use the fused fast path where it applies (see ``use_fused``)

    # -- hyperparameters that may change during training ------------------------------------
    def set_lora_alpha(self, lora_alpha: float) -> None:
        """Change lora_alpha (e.g. alpha doubling); the scaling follows in place."""
        if self.merged:
            raise RuntimeError("cannot change lora_alpha of a merged adapter; unmerge it first")
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
        ratio = self.scaling / lora_scaling(self.lora_alpha, self.r, self.use_rslora)
        self.lora_alpha = float(lora_alpha)
        self.scaling = ratio * lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    # -- helpers --------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (so code that reads ``layer.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def dropout_is_identity(self) -> bool:
        """True when the branch sees exactly the input x (no dropout active)."""
        return isinstance(self.lora_dropout, nn.Identity) or not self.training

    def dropout_input(self, x: torch.Tensor) -> torch.Tensor:
        """x_d = mask ⊙ x / (1 - p), mask ~ Bernoulli(1 - p); x itself in eval or with p = 0. Its own ``nn.Dropout``
        (PEFT's draw), or with a ``dropout_cache`` the mask shared with the other layers reading this very ``x`` in
        this forward pass (see :mod:`adapters.dropout`)."""
        if self.dropout_is_identity:
            return x
        if self.dropout_cache is None:
            return self.lora_dropout(x)
        return self.dropout_cache(self, x, self.lora_dropout_p)

    def use_fused(self, x: torch.Tensor) -> bool:
        """Whether the fused path applies: enabled, a plain nn.Linear base without hooks, no autocast."""
        base = self.base_layer
        return (
            self.fused
            and type(base) is nn.Linear
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not autocast_active(x.device.type)
        )

    @classmethod
    def setup_shared(cls, model: nn.Module, layers: list[AdapterLayer]) -> None:
        """Called by ``wrap_linears`` once with every layer of this kind it just injected: where a method shares
        tensors between layers, register them (a :class:`SharedAdapterState`) on ``model`` here. Default: nothing."""

    def delta_weight(self) -> torch.Tensor:
        """The dense (out, in) update this adapter adds to the base weight."""
        raise NotImplementedError

    def initial_weight(self) -> torch.Tensor:
        """W_0, the weight the layer computes with at initialisation (adapters start as a no-op: the base W)."""
        if self.merged:
            raise RuntimeError("the initial weight of a merged adapter is not kept; unmerge it first")
        return self.base_layer.weight.detach()

    def merged_weight(self) -> torch.Tensor:
        """W_t, the weight the layer computes with now: W + delta_weight (detached)."""
        if self.merged:
            return self.base_layer.weight.detach()
        with torch.no_grad():
            return self.base_layer.weight + self.delta_weight().to(self.base_layer.weight.dtype)

    def peft_tensors(self) -> tuple[int, dict[str, torch.Tensor]]:
        """``(rank, tensors)`` in PEFT's LoRA format, keys relative to this module (``lora_A.weight``, ...).
        Raises ValueError where PEFT has no format for the layer."""
        return self.lora_A.shape[0], {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach()}

    def is_frozen_direction(self, param_name: str) -> bool:
        """True for adapter parameters that stay frozen when the model is wrapped (none by default)."""
        return False

    def direction_parameters(self) -> int:
        """Entries of the LoRA factors (A and B) this layer keeps."""
        return self.lora_A.numel() + self.lora_B.numel()

    def merge(self) -> None:
        """Fold the update into the frozen weight: W <- W + delta (additive adapters)."""
        if not self.merged:
            self._add_to_weight(self.delta_weight().detach())
            self.merged = True

    def unmerge(self) -> None:
        """Undo ``merge``: W <- W - delta."""
        if self.merged:
            self._add_to_weight(-self.delta_weight().detach())
            self.merged = False

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.add_(delta.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


class LowRankLinear(AdapterLayer):
    """An adapter on ``nn.Linear`` with one (A, B) pair: A kaiming-uniform(a=sqrt 5), B zeros."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"{type(self).__name__} wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


class TaskDirectionsLinear(AdapterLayer):
    """An adapter on ``nn.Linear`` with one LoRA pair (A_t, B_t) per task, shared by the continual-learning layers.

    The current task's pair trains; :meth:`freeze_current` freezes it and from then on scales it by
    ``1 / (||A_t|| ||B_t||)`` (``direction_scale[t]``; a pair that never moved stays zero), so earlier tasks are
    directions as SD-LoRA defines them. Subclasses add the per-task coefficients and open pairs with
    :meth:`open_direction`.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"{type(self).__name__} wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        weight = base_layer.weight
        self.register_buffer("direction_scale", torch.empty(0, device=weight.device, dtype=weight.dtype))

    @property
    def num_tasks(self) -> int:
        return len(self.lora_A)

    @torch.no_grad()
    def open_direction(self, scale: float) -> None:
        """Append a new pair (A kaiming-uniform, B zeros) whose factor is ``scale`` until it is frozen."""
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        a = torch.empty(self.r, self.in_features, **factory)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(torch.zeros(self.out_features, self.r, **factory)))
        self.direction_scale = torch.cat([self.direction_scale, torch.full((1,), float(scale), **factory)])

    @torch.no_grad()
    def freeze_current(self) -> None:
        """Freeze the current task's (A, B) and divide it by ||A|| ||B|| from now on."""
        t = self.num_tasks - 1
        a, b = self.lora_A[t], self.lora_B[t]
        a.requires_grad_(False)
        b.requires_grad_(False)
        norm = a.norm() * b.norm()
        # a direction that never moved (B still zero) stays zero instead of dividing by zero
        self.direction_scale[t] = 1.0 / norm if norm > 0 else 0.0

    def is_frozen_direction(self, param_name: str) -> bool:
        """Earlier tasks' directions stay frozen."""
        kind, _, index = param_name.partition(".")
        return kind in ("lora_A", "lora_B") and int(index) < self.num_tasks - 1

    def task_delta(self, coefficients: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """``sum_{t in tasks} coefficients[t] B_t A_t``: the dense (out, in) update."""
        delta = torch.zeros_like(self.base_layer.weight)
        for t in tasks:
            delta = delta + coefficients[t] * (self.lora_B[t] @ self.lora_A[t])
        return delta
