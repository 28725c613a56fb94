"""LoRA (Hu et al., 2021): ``y = W x + b + s * B A dropout(x)``; the defaults of :class:`Method` are LoRA's."""

from __future__ import annotations

from trainers.methods.base import Method


class LoraMethod(Method):
    name = "lora"


METHOD = LoraMethod()
