"""DoRA (Liu et al., 2024): ``y = (m / ||W + s B A||_row) (W x + s B A x) + b``; trained like LoRA."""

from __future__ import annotations

from trainers.methods.base import Method


class DoraMethod(Method):
    name = "dora"


METHOD = DoraMethod()
