"""LoRA+ plug-in: B learns loraplus_lr_ratio times faster than A (and the head), end to end through the CLI config."""

from __future__ import annotations

import json

import pytest
import torch
from _config import TINY_RUN, compose_config
from _tiny_models import tiny_bert
from _trainer_helpers import read_json
from omegaconf import OmegaConf

from adapters import LoraLinear, adapter_layers, wrap_linears
from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError
from trainers.experiments.single import train_run
from trainers.loop.optimizers import build_optimizers, build_warmup_scheduler
from trainers.methods import get_method

TINY = [*TINY_RUN, "trainer.log_every_steps=1"]


def make(overrides):
    return compose_config(["adapter=loraplus", *TINY, *overrides])


def optimizer_cfg(ratio: float):
    return OmegaConf.create({"adapter": {"loraplus_lr_ratio": ratio},
                             "trainer": {"base_lr": 2e-3, "betas": [0.9, 0.98], "weight_decay": 0.01,
                                         "warmup_ratio": 0.1, "optimizer_impl": "for_loop"}})


def test_b_gets_ratio_times_the_learning_rate_of_everything_else():
    torch.manual_seed(0)
    model = tiny_bert()
    wrap_linears(model, "all-linear", adapter="lora", r=4, modules_to_save=["classifier"])
    (spec,) = get_method("loraplus").optimizers(model, optimizer_cfg(16.0))
    optimizer = build_optimizers([spec])["base"]
    slow, fast = optimizer.param_groups
    b_ids = {id(layer.lora_B) for layer in adapter_layers(model, LoraLinear).values()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in fast["params"]} == b_ids
    assert {id(p) for p in slow["params"]} == trainable - b_ids  # every A and the head
    assert (slow["lr"], fast["lr"]) == (2e-3, pytest.approx(2e-3 * 16))
    assert slow["weight_decay"] == fast["weight_decay"] == 0.01
    scheduler = build_warmup_scheduler(optimizer, 100, 0.1)
    for _ in range(37):  # warmup and decay scale both groups alike
        optimizer.step()
        scheduler.step()
        assert fast["lr"] == pytest.approx(16 * slow["lr"])


def test_one_step_equals_adamw_with_an_explicit_fast_b_group():
    torch.manual_seed(0)
    ours = tiny_bert()
    wrap_linears(ours, "all-linear", adapter="lora", r=4, modules_to_save=["classifier"])
    for layer in adapter_layers(ours, LoraLinear).values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    reference = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in ours.named_parameters()}
    (spec,) = get_method("loraplus").optimizers(ours, optimizer_cfg(8.0))
    optimizer = build_optimizers([spec])["base"]
    ids = torch.randint(0, 64, (3, 7))
    ours(input_ids=ids, labels=torch.tensor([0, 1, 0])).loss.backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    optimizer.step()
    fast = [reference[n] for n in grads if n.endswith("lora_B")]
    slow = [reference[n] for n in grads if not n.endswith("lora_B")]
    for name, param in reference.items():
        if name in grads:
            param.grad = grads[name]
    expected = torch.optim.AdamW([{"params": slow}, {"params": fast, "lr": 2e-3 * 8}], lr=2e-3, betas=(0.9, 0.98),
                                 weight_decay=0.01)
    expected.step()
    for name, param in ours.named_parameters():
        assert torch.equal(param.detach(), reference[name].detach()), name


def test_config_checks_and_end_to_end_run_with_peft_export(tmp_path):
    with pytest.raises(UserError, match="adapter.loraplus_lr_ratio must be > 0"):
        validate_config(make(["adapter.loraplus_lr_ratio=0"]))
    cfg = make(["adapter.loraplus_lr_ratio=4"])
    validate_config(cfg)
    result = train_run(cfg, tmp_path)
    assert result["status"] == "completed" and result["global_step"] == 5
    config = read_json(tmp_path / "adapter" / "adapter_config.json")
    assert config["peft_type"] == "LORA" and config["use_dora"] is False and config["r"] == 8
    lines = [line for line in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if line["split"] == "train"]
    assert len(lines) == 5 and lines[0]["lr"] > 0  # the slow group's lr (warmup then decay to 0)
