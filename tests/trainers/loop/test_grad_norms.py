"""Gradient norms in metrics.jsonl: the global norm before clipping at every logged step (with and without
clipping), and per component with ``trainer.log_grad_norms=true``, checked against a float64 recomputation
from the gradients the optimizer was about to use."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _config import compose_config
from _trainer_helpers import jsonl

from trainers.experiments.single import train_run
from trainers.loop.grad_norms import OTHER, classify_parameters
from trainers.loop.hooks import TrainerCallback

CONF = Path(__file__).resolve().parents[3] / "conf"
TINY = ["model=tiny-random-bert", "dataset.max_train_samples=40", "dataset.max_eval_samples=16",
        "trainer.batch_size=8", "trainer.eval_batch_size=16", "trainer.log_every_steps=2",
        "trainer.save_every_steps=0"]
PROBE = "+trainer.callbacks.probe._target_=test_grad_norms.GradProbe"


class GradProbe(TrainerCallback):
    """Records, at every step, the float64 norm of each trainable gradient before the optimizer step."""

    seen: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer) -> None:
        GradProbe.seen[trainer.state.global_step + 1] = {
            name: float(p.grad.double().norm()) for name, p in trainer.model.named_parameters()
            if p.requires_grad and p.grad is not None}


def make(overrides):
    return compose_config(TINY + list(overrides))


pytestmark = pytest.mark.usefixtures("one_thread")  # small runs on one thread (conftest.py)


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.0])
def test_global_norm_before_clipping_at_every_logged_step(tmp_path, max_grad_norm):
    GradProbe.seen = {}
    cfg = make([f"trainer.max_grad_norm={max_grad_norm}", PROBE])
    train_run(cfg, tmp_path)
    lines = jsonl(tmp_path, "train")
    assert [x["step"] for x in lines] == [2, 4, 5]
    for line in lines:
        expected = math.sqrt(sum(v * v for v in GradProbe.seen[line["step"]].values()))
        assert line["grad_norm"] == pytest.approx(expected, rel=1e-5)
        if max_grad_norm:
            assert line["grad_norm"] > 10 * max_grad_norm  # the norm before clipping, not after
    assert not any(k.startswith("grad_norm_") for x in lines for k in x)  # components only when asked for
    assert (tmp_path / "curves.png").stat().st_size > 1000  # every run draws its curves


@pytest.mark.parametrize(("adapter", "components"), [
    ("dora", {"lora_A", "lora_B", "magnitude", "head"}),
    ("sora", {"lora_A", "lora_B", "gate", "head"}),
])
def test_component_norms(tmp_path, adapter, components):
    GradProbe.seen = {}
    cfg = make([f"adapter={adapter}", "trainer.log_grad_norms=true", PROBE])
    train_run(cfg, tmp_path)
    suffix = {"lora_A": ".lora_A", "lora_B": ".lora_B", "magnitude": ".magnitude", "gate": ".gate"}
    for line in jsonl(tmp_path, "train"):
        logged = {k[len("grad_norm_"):]: v for k, v in line.items() if k.startswith("grad_norm_")}
        assert set(logged) == components
        seen = GradProbe.seen[line["step"]]
        for component, value in logged.items():
            if component == "head":
                names = [n for n in seen if n.startswith("classifier.")]
            else:
                names = [n for n in seen if n.endswith(suffix[component])]
            assert names and value == pytest.approx(math.sqrt(sum(seen[n] ** 2 for n in names)), rel=1e-5)
        # the components partition the trainable parameters: together they are the global norm
        assert math.sqrt(sum(v * v for v in logged.values())) == pytest.approx(line["grad_norm"], rel=1e-5)


def test_classify_parameters_first_match_wins_and_the_rest_is_other():
    params = {n: torch.zeros(1) for n in ("a.lora_A", "a.lora_B", "a.lora_A.0", "classifier.weight", "x.bias")}
    groups = classify_parameters(list(params.items()), {"lora_A": r"(^|\.)lora_A(\.\d+)?$",
                                                        "head": r"(^|\.)classifier\.", "any": r"lora"})
    ids = {k: [id(p) for p in v] for k, v in groups.items()}
    assert ids == {"lora_A": [id(params["a.lora_A"]), id(params["a.lora_A.0"])],
                   "any": [id(params["a.lora_B"])], "head": [id(params["classifier.weight"])],
                   OTHER: [id(params["x.bias"])]}
