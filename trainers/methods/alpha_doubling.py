"""The alpha-doubling schedule (``schedule=alpha_doubling``): the adapters' lora_alpha grows after every epoch.

In epoch e (counted from 0) every adapter layer has ``lora_alpha = alpha_start * alpha_growth ** e``; the
scaling follows in place (``AdapterLayer.set_lora_alpha``, s = lora_alpha / r or / sqrt(r)). The value is a
function of the epoch counter, so a resumed run continues with the right alpha. Training is one stage (one
learning-rate schedule over all epochs), as with ``constant``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainers.loop.hooks import TrainerCallback

if TYPE_CHECKING:
    from trainers.loop.trainer import Trainer


class AlphaDoubling(TrainerCallback):
    """Set ``lora_alpha = alpha_start * alpha_growth ** epoch`` on every adapter layer before each step."""

    def __init__(self, alpha_start: float, alpha_growth: float) -> None:
        self.alpha_start, self.alpha_growth = float(alpha_start), float(alpha_growth)
        self._applied: float | None = None  # the alpha the layers hold, so steps within an epoch skip the walk

    def alpha(self, epoch: int) -> float:
        return self.alpha_start * self.alpha_growth ** epoch

    def apply(self, trainer: Trainer, epoch: int) -> None:
        from adapters import adapter_layers

        alpha = self.alpha(epoch)
        if alpha == self._applied:
            return
        for layer in adapter_layers(trainer.model).values():
            if layer.lora_alpha != alpha:
                layer.set_lora_alpha(alpha)
        self._applied = alpha

    def on_train_begin(self, trainer: Trainer) -> None:
        state = trainer.state  # at an epoch boundary: the epoch just trained (a finished run evaluates with it)
        self.apply(trainer, state.epoch - 1 if state.batch_in_epoch == 0 and state.epoch > 0 else state.epoch)

    def on_step_begin(self, trainer: Trainer) -> None:
        self.apply(trainer, trainer.state.epoch)

    def log_values(self, trainer: Trainer) -> dict[str, float]:
        return {"lora_alpha": self.alpha(trainer.state.epoch)}
