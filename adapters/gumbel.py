"""Gumbel CL-LoRA: one LoRA direction pair per task, mixed by a sparse Gumbel-Sparsemax gate.

For tasks t = 0..T-1 (T - 1 is the task being learned):

    direction_t = s * B_t A_t                          current task (B starts at zero: no-op)
    direction_i = B_i A_i / (||A_i|| ||B_i||)          earlier tasks, frozen (SD-LoRA normalisation)
    beta        = sparsemax((logits + G) / tau)        over the active tasks; G ~ Gumbel(0, 1) in
                                                       training, G = 0 in eval
    y           = W x + b + sum_t beta_t * alpha_t * direction_t dropout(x)

alpha_t is a learned magnitude per task (initialised to 0.8 as in SD-LoRA); the logits and every
alpha stay trainable, only earlier directions are frozen. The gate is per layer (``gate="layer"``: each layer
its own logits) or global (``gate="global"``: one logit vector for the whole model, one Gumbel sample per model
forward shared by every layer, as the seed logs one beta vector; :class:`SharedGate`).

A pruned task keeps its tensors but is masked out of the gate, so its beta is exactly 0 and it contributes
nothing. All active directions are evaluated with two matmuls by concatenating the A's and B's along the
rank axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from entmax import sparsemax
from torch import nn

from .base import AdapterLayer, SharedAdapterState, TaskDirectionsLinear, adapter_layers, low_rank_linear

GATE_MODES = ("layer", "global")
SHARED_GATE_ATTR = "gumbel_gate"  # the model attribute holding the global gate


def gumbel_sparsemax(logits: torch.Tensor, tau: float, noise: bool = True) -> torch.Tensor:
    """sparsemax((logits + G) / tau) along the last dim; G ~ Gumbel(0, 1) when ``noise``."""
    if noise:
        uniform = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-10)
        logits = logits - torch.log(-torch.log(uniform))
    return sparsemax(logits / tau, dim=-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p with 0 log 0 = 0 (sparsemax outputs exact zeros)."""
    safe = torch.where(probs > 0, probs, torch.ones_like(probs))
    return -(probs * torch.log(safe)).sum(dim=-1)


class SharedGate(SharedAdapterState):
    """One task gate for every Gumbel layer of a model: ``gate_logits`` (tasks,). In training one Gumbel sample is
    drawn per model forward (the first layer to ask draws it, a forward pre-hook on the model clears it)."""

    def __init__(self, gate_logits: torch.Tensor) -> None:
        super().__init__()
        self.gate_logits = nn.Parameter(gate_logits.detach().clone())
        self._sample: torch.Tensor | None = None

    def clear_sample(self, *args: object) -> None:
        """Forget the current forward's sample (the model's forward pre-hook)."""
        self._sample = None

    @torch.no_grad()
    def add_task(self) -> None:
        self.gate_logits = nn.Parameter(torch.cat([self.gate_logits, self.gate_logits.new_zeros(1)]))
        self._sample = None

    def beta(self, active: torch.Tensor, tau: float, noise: bool) -> torch.Tensor:
        """The gate over all tasks (inactive ones exactly 0); with ``noise`` the same sample for the whole forward."""
        if noise and self._sample is not None:
            return self._sample
        beta = torch.zeros_like(self.gate_logits)
        if active.any():
            beta = beta.index_put((active,), gumbel_sparsemax(self.gate_logits[active], tau, noise))
        if noise:
            self._sample = beta
        return beta


class GumbelLinear(TaskDirectionsLinear):
    """A continual-learning adapter on ``nn.Linear`` with per-task directions and a task gate."""

    adapter_name = "gumbel"
    mergeable = False  # the gate is stochastic in training

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        tau: float = 5.0,
        magnitude_init: float = 0.8,
        gate: str = "layer",
    ) -> None:
        if gate not in GATE_MODES:
            raise ValueError(f"gate must be one of {', '.join(GATE_MODES)}, got {gate!r}")
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        self.gate_mode = gate
        self._gate: tuple[SharedGate, ...] = ()  # the model's global gate (a tuple: not registered here)
        self.tau = float(tau)
        self.magnitude_init = float(magnitude_init)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.magnitudes = nn.Parameter(torch.empty(0, **factory))
        self.gate_logits = nn.Parameter(torch.empty(0, **factory))
        self.register_buffer("active", torch.empty(0, dtype=torch.bool, device=factory["device"]))
        self.last_beta: torch.Tensor | None = None
        self.add_task()

    # -- task bookkeeping --------------------------------------------------------------------
    @torch.no_grad()
    def add_task(self) -> None:
        """Freeze and normalise the current direction (if any) and open a new one for the next task."""
        if self.num_tasks:
            self.freeze_current()
        # the current task's direction is not normalised: its factor is the plain scaling s
        self.open_direction(self.scaling)
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.magnitudes = nn.Parameter(torch.cat([self.magnitudes, torch.full((1,), self.magnitude_init, **factory)]))
        if not self._gate:  # a global gate grows in add_gumbel_task
            self.gate_logits = nn.Parameter(torch.cat([self.gate_logits, torch.zeros(1, **factory)]))
        self.active = torch.cat([self.active, torch.ones(1, dtype=torch.bool, device=weight.device)])

    @torch.no_grad()
    def prune_task(self, task: int) -> None:
        """Mask task ``task`` out of the gate: its beta becomes exactly 0."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} does not exist (this layer has {self.num_tasks} tasks)")
        self.active[task] = False

    # -- the gate ------------------------------------------------------------------------------
    @classmethod
    def setup_shared(cls, model: nn.Module, layers: list[AdapterLayer]) -> None:
        """With ``gate="global"``: register one :class:`SharedGate` on ``model`` (``model.gumbel_gate``) for all
        ``layers`` (their own logits are removed) and a forward pre-hook that draws a new sample per forward."""
        if not layers or layers[0].gate_mode != "global":
            return
        if getattr(model, SHARED_GATE_ATTR, None) is not None:
            raise ValueError("the model already has a global Gumbel gate; wrap all targets in one call")
        shared = SharedGate(layers[0].gate_logits)
        setattr(model, SHARED_GATE_ATTR, shared)
        model.register_forward_pre_hook(shared.clear_sample)
        for layer in layers:
            del layer.gate_logits
            layer._gate = (shared,)

    def logits(self) -> torch.Tensor:
        """This layer's gate logits (the model's global ones with ``gate="global"``)."""
        return self._gate[0].gate_logits if self._gate else self.gate_logits

    def beta(self, noise: bool | None = None) -> torch.Tensor:
        """Gate weights over all tasks (pruned tasks exactly 0). Noise defaults to ``self.training``."""
        noise = self.training if noise is None else noise
        if self._gate:
            return self._gate[0].beta(self.active, self.tau, noise)
        beta = torch.zeros_like(self.gate_logits)
        if self.active.any():
            beta = beta.index_put((self.active,), gumbel_sparsemax(self.gate_logits[self.active], self.tau, noise))
        return beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        beta = self.beta()
        self.last_beta = beta
        tasks = self.active.nonzero().flatten().tolist()
        if not tasks:
            return self.base_layer(x)
        coeff = beta * self.magnitudes * self.direction_scale  # per task
        a_cat = torch.cat([self.lora_A[t] for t in tasks])
        b_cat = torch.cat([self.lora_B[t] for t in tasks], dim=1)
        rank_coeff = coeff[tasks].repeat_interleave(self.r)
        x_d = self.dropout_input(x)
        if self.use_fused(x):  # the per-rank coefficients act as the gate of the fused node
            return low_rank_linear(x, self.base_layer, a_cat, b_cat, 1.0, rank_coeff, x_d)
        hidden = F.linear(x_d, a_cat) * rank_coeff
        return self.base_layer(x) + F.linear(hidden, b_cat)

    def delta_weight(self) -> torch.Tensor:
        """sum_t beta_t alpha_t direction_t with the deterministic (eval) gate."""
        coeff = self.beta(noise=False) * self.magnitudes * self.direction_scale
        return self.task_delta(coeff, self.active.nonzero().flatten().tolist())

    def peft_tensors(self) -> tuple[int, dict[str, torch.Tensor]]:
        raise ValueError("PEFT has no format for Gumbel CL-LoRA layers")

    def direction_parameters(self) -> int:
        """A and B entries of the active tasks only (a pruned task's pair can be dropped)."""
        return sum(self.lora_A[t].numel() + self.lora_B[t].numel() for t in self.active.nonzero().flatten().tolist())

    def gate_entropy(self) -> torch.Tensor:
        """Entropy of the gate used in the last forward pass (the sparsity loss term)."""
        if self.last_beta is None:
            return self.logits().new_zeros(())
        return entropy(self.last_beta)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, tasks={self.num_tasks}, active={int(self.active.sum())}, tau={self.tau:g}, "
                f"gate={self.gate_mode}")


# -- model-level operations on every Gumbel layer ----------------------------------------------
def set_gumbel_tau(model: nn.Module, tau: float) -> None:
    """Set the Gumbel-Sparsemax temperature of every Gumbel CL-LoRA layer."""
    for layer in adapter_layers(model, GumbelLinear).values():
        layer.tau = float(tau)


def add_gumbel_task(model: nn.Module) -> int:
    """Freeze and normalise every Gumbel layer's current direction and open one for a new task.

    Returns the number of tasks per layer afterwards (0 when the model has no Gumbel layers).
    """
    layers = list(adapter_layers(model, GumbelLinear).values())
    for layer in layers:
        layer.add_task()
    shared = getattr(model, SHARED_GATE_ATTR, None)
    if isinstance(shared, SharedGate) and layers:
        shared.add_task()
    return layers[0].num_tasks if layers else 0


def prune_gumbel_task(model: nn.Module, task: int) -> None:
    """Mask task ``task`` out of every Gumbel layer's gate (its beta becomes exactly 0)."""
    for layer in adapter_layers(model, GumbelLinear).values():
        layer.prune_task(task)


@torch.no_grad()
def gumbel_betas(model: nn.Module) -> torch.Tensor:
    """Deterministic (noise-free) gates of every Gumbel layer, stacked: shape (layers, tasks); (0, 0) if none."""
    layers = list(adapter_layers(model, GumbelLinear).values())
    if not layers:
        return torch.zeros(0, 0)
    return torch.stack([layer.beta(noise=False).detach().float().cpu() for layer in layers])


@torch.no_grad()
def gumbel_contributions(model: nn.Module) -> torch.Tensor:
    """Each task's share of the update in every Gumbel layer, noise-free: |beta_t alpha_t| / sum_k |beta_k alpha_k|
    (rows sum to 1, or are all 0 when every term is 0); shape (layers, tasks), (0, 0) if none."""
    layers = list(adapter_layers(model, GumbelLinear).values())
    if not layers:
        return torch.zeros(0, 0)
    rows = []
    for layer in layers:
        weight = (layer.beta(noise=False) * layer.magnitudes).detach().float().abs().cpu()
        total = weight.sum()
        rows.append(weight / total if total > 0 else weight)
    return torch.stack(rows)


def gumbel_active_tasks(model: nn.Module) -> torch.Tensor:
    """Which tasks are active (not pruned) in at least one Gumbel layer, as a bool vector over tasks."""
    layers = list(adapter_layers(model, GumbelLinear).values())
    if not layers:
        return torch.zeros(0, dtype=torch.bool)
    return torch.stack([layer.active.detach().cpu() for layer in layers]).any(0)


@torch.no_grad()
def drop_zero_beta_tasks(model: nn.Module) -> dict[int, int]:
    """Prune, layer by layer, every active task whose noise-free beta is exactly 0 there. Removing it cannot change
    the layer's eval output: its term is 0, and sparsemax's threshold depends only on the entries above it, so the
    other betas stay the same. Returns task -> number of layers it was dropped from."""
    dropped: dict[int, int] = {}
    for layer in adapter_layers(model, GumbelLinear).values():
        beta = layer.beta(noise=False)
        for t in (layer.active & (beta == 0)).nonzero().flatten().tolist():
            layer.prune_task(t)
            dropped[t] = dropped.get(t, 0) + 1
    return dropped


def gumbel_sparsity_loss(model: nn.Module) -> torch.Tensor:
    """Mean entropy of the task gates used in the last forward pass (0 without Gumbel layers)."""
    layers = list(adapter_layers(model, GumbelLinear).values())
    if not layers:
        return torch.zeros(())
    return torch.stack([layer.gate_entropy() for layer in layers]).mean()
