"""SD-LoRA (Wu et al., ICLR 2025): gate-free continual LoRA with frozen, normalised earlier directions.

For tasks t = 0..T-1 (T - 1 is the task being learned), in every adapted layer:

    y = W x + b + sum_{i<T-1} m_i B_i A_i x / (||B_i||_F ||A_i||_F)     earlier tasks, frozen
                + m_{T-1} B_{T-1} A_{T-1} x                             current task, not normalised

``m`` holds ONE learnable magnitude per task, shared by every layer of the model (the official code's
``scaling_factor`` / ``scaling_factor_prev``), and all of them are reset to ``magnitude_init`` (0.8) when a
new task opens. There is no gate and no ``lora_alpha / r`` factor: the current direction is scaled by its
magnitude only. The magnitudes live in one :class:`SharedMagnitudes` module that :meth:`SDLoraLinear.setup_shared`
registers on the model (``model.sdlora_magnitudes``); the layers hold an unregistered reference, so
``named_parameters`` / ``state_dict`` / optimizers see the vector exactly once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, SharedAdapterState, TaskDirectionsLinear, adapter_layers, low_rank_linear

SHARED_ATTR = "sdlora_magnitudes"  # the model attribute holding the shared magnitudes


class SharedMagnitudes(SharedAdapterState):
    """``magnitudes`` (tasks,): one learnable scalar per task, shared by every SD-LoRA layer of a model."""

    def __init__(self, magnitude_init: float = 0.8, tasks: int = 1, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.magnitude_init = float(magnitude_init)
        self.magnitudes = nn.Parameter(torch.full((tasks,), self.magnitude_init, device=device, dtype=dtype))

    @torch.no_grad()
    def reset(self, tasks: int) -> None:
        """A fresh (trainable) vector of ``tasks`` magnitudes, every one at ``magnitude_init``."""
        old = self.magnitudes
        self.magnitudes = nn.Parameter(torch.full((tasks,), self.magnitude_init, device=old.device, dtype=old.dtype))

    def extra_repr(self) -> str:
        return f"tasks={self.magnitudes.numel()}, magnitude_init={self.magnitude_init:g}"


class SDLoraLinear(TaskDirectionsLinear):
    """SD-LoRA on ``nn.Linear``: one (A, B) pair per task (A kaiming-uniform, B zeros), no gate.

    ``lora_alpha`` does not enter the output (SD-LoRA scales by the magnitudes only). Stand-alone, the layer
    owns its magnitudes; :meth:`setup_shared` (called by ``wrap_linears``) makes all layers of a model share one.
    """

    adapter_name = "sdlora"
    mergeable = True

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        magnitude_init: float = 0.8,
    ) -> None:
        if not magnitude_init > 0:
            raise ValueError(f"magnitude_init must be positive, got {magnitude_init!r}")
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.own_magnitudes = SharedMagnitudes(magnitude_init, 0, **factory)
        self._shared: tuple[SharedMagnitudes, ...] = ()  # a tuple: a reference nn.Module does not register
        self._open_pair()

    # -- the magnitudes --------------------------------------------------------------------------
    @property
    def shared(self) -> SharedMagnitudes:
        """The magnitudes this layer uses (the model's shared module, or its own when stand-alone)."""
        return self._shared[0] if self._shared else self.own_magnitudes

    @property
    def magnitudes(self) -> torch.Tensor:
        return self.shared.magnitudes

    def use_shared(self, shared: SharedMagnitudes) -> None:
        """Use ``shared`` (registered elsewhere, e.g. on the model) instead of this layer's own magnitudes."""
        if "own_magnitudes" in self._modules:
            del self._modules["own_magnitudes"]
        self._shared = (shared,)

    @classmethod
    def setup_shared(cls, model: nn.Module, layers: list[AdapterLayer]) -> None:
        """Register one :class:`SharedMagnitudes` on ``model`` (``model.sdlora_magnitudes``) for ``layers``."""
        if not layers:
            return
        if getattr(model, SHARED_ATTR, None) is not None:
            raise ValueError("the model already has SD-LoRA layers; wrap all targets in one call")
        first = layers[0]
        shared = SharedMagnitudes(first.shared.magnitude_init, first.num_tasks, first.weight.device,
                                  first.weight.dtype)
        setattr(model, SHARED_ATTR, shared)
        for layer in layers:
            layer.use_shared(shared)

    # -- task bookkeeping --------------------------------------------------------------------------
    @torch.no_grad()
    def _open_pair(self) -> None:
        self.open_direction(1.0)  # the current pair is not normalised
        if not self._shared:
            self.own_magnitudes.reset(self.num_tasks)

    @torch.no_grad()
    def add_task(self) -> None:
        """Freeze the current pair, divide it by ||B||_F ||A||_F from now on, and open a new pair (B = 0).
        The magnitudes are not touched here (:func:`add_sdlora_task` resets the shared vector)."""
        if self.merged:
            raise RuntimeError("cannot add a task to a merged SD-LoRA layer; unmerge it first")
        self.freeze_current()
        self._open_pair()

    # -- forward -----------------------------------------------------------------------------------------
    def coefficients(self) -> torch.Tensor:
        """Per-task factors m_i / (||B_i|| ||A_i||) (earlier tasks) and m_t (current), shape (tasks,)."""
        magnitudes = self.magnitudes
        if magnitudes.numel() != self.num_tasks:
            raise RuntimeError(f"{magnitudes.numel()} magnitudes for {self.num_tasks} tasks: open tasks with "
                               f"adapters.add_sdlora_task(model)")
        return magnitudes.to(self.direction_scale.dtype) * self.direction_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        a_cat = torch.cat(list(self.lora_A))
        b_cat = torch.cat(list(self.lora_B), dim=1)
        rank_coeff = self.coefficients().repeat_interleave(self.r)
        x_d = self.dropout_input(x)
        if self.use_fused(x):  # the per-rank coefficients act as the gate of the fused node
            return low_rank_linear(x, self.base_layer, a_cat, b_cat, 1.0, rank_coeff, x_d)
        return self.base_layer(x) + F.linear(F.linear(x_d, a_cat) * rank_coeff.to(x.dtype), b_cat)

    def delta_weight(self) -> torch.Tensor:
        """sum_i coefficient_i B_i A_i (the dense update; merge folds it into W)."""
        return self.task_delta(self.coefficients(), list(range(self.num_tasks)))

    def peft_tensors(self) -> tuple[int, dict[str, torch.Tensor]]:
        raise ValueError("PEFT has no format for SD-LoRA layers")

    def direction_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in zip(self.lora_A, self.lora_B, strict=True))

    def extra_repr(self) -> str:
        return f"r={self.r}, tasks={self.num_tasks}, merged={self.merged}"


# -- model-level operations ---------------------------------------------------------------------------
def sdlora_layers(model: nn.Module) -> list[SDLoraLinear]:
    return list(adapter_layers(model, SDLoraLinear).values())


def add_sdlora_task(model: nn.Module) -> int:
    """Freeze and normalise every SD-LoRA layer's current pair, open pair T, and reset the shared magnitudes
    to ``magnitude_init`` for all T + 1 tasks. Returns the tasks per layer afterwards (0 without SD-LoRA layers)."""
    layers = sdlora_layers(model)
    for layer in layers:
        layer.add_task()
    shared = getattr(model, SHARED_ATTR, None)
    if isinstance(shared, SharedMagnitudes) and layers:
        shared.reset(layers[0].num_tasks)
    return layers[0].num_tasks if layers else 0


def sdlora_magnitudes(model: nn.Module) -> list[float]:
    """The shared per-task magnitudes of ``model`` ([] without SD-LoRA layers)."""
    layers = sdlora_layers(model)
    return layers[0].magnitudes.detach().float().cpu().tolist() if layers else []
