"""Faithful SD-LoRA: the layer against the paper's equations in float64, the shared per-task magnitudes (one
parameter per model, reset to 0.8 per task), its optimizers and first-task settings, and `python main.py`
end to end with exact resume inside and between tasks."""

from __future__ import annotations

import signal

import pytest
import torch
from _config import compose_config
from _trainer_helpers import assert_one_line_error, read_json, run_main
from omegaconf import OmegaConf
from torch import nn

from adapters import (
    SDLoraLinear,
    adapter_layers,
    adapter_state_dict,
    add_sdlora_task,
    load_adapter_state_dict,
    lora_direction_parameters,
    merge_model,
    wrap_linears,
)
from trainers.methods import get_method


def sdlora_formula(x, w, b, pairs, magnitudes):
    """SD-LoRA, eq. of the paper: W x + b + sum_{i<t} m_i B_i A_i x / (||B_i||_F ||A_i||_F) + m_t B_t A_t x."""
    y = x @ w.T + b
    last = len(pairs) - 1
    for i, (a, bb) in enumerate(pairs):
        direction = bb @ a if i == last else bb @ a / (torch.linalg.norm(bb) * torch.linalg.norm(a))
        y = y + magnitudes[i] * (x @ direction.T)
    return y


def three_task_model(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    wrap_linears(model, ["0", "2"], adapter="sdlora", r=2, lora_alpha=16)
    for _ in range(2):  # train B a little (random values) before each new task opens
        for layer in adapter_layers(model, SDLoraLinear).values():
            layer.lora_B[-1].data.normal_()
        add_sdlora_task(model)
    for layer in adapter_layers(model, SDLoraLinear).values():
        layer.lora_B[-1].data.normal_()
    return model


@pytest.mark.parametrize("fused", [True, False])
def test_forward_equals_the_papers_formula_in_float64(fused):
    model = three_task_model()
    layer = model[0]
    layer.fused = fused
    with torch.no_grad():
        model.sdlora_magnitudes.magnitudes.copy_(torch.tensor([0.3, -1.7, 2.5], dtype=torch.float64))
    x = torch.randn(4, 6, 7, dtype=torch.float64)
    pairs = [(a.detach(), b.detach()) for a, b in zip(layer.lora_A, layer.lora_B, strict=True)]
    expected = sdlora_formula(x, layer.weight.detach(), layer.bias.detach(), pairs, [0.3, -1.7, 2.5])
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    # lora_alpha (16) and r (2) do not enter: the current direction's factor is its magnitude only
    merge_model(model)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_magnitudes_are_one_shared_parameter_seen_once():
    model = three_task_model(torch.float32)
    shared = model.sdlora_magnitudes.magnitudes
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable.count("sdlora_magnitudes.magnitudes") == 1 and not any("magnitudes" in n and n.startswith(
        ("0.", "2.")) for n in trainable)
    assert all(layer.magnitudes is shared for layer in adapter_layers(model, SDLoraLinear).values())
    state = adapter_state_dict(model)
    assert [k for k in state if "magnitudes" in k] == ["sdlora_magnitudes.magnitudes"]
    # only the current pair trains; the gradient of the shared magnitude collects every layer's contribution
    assert sorted(n for n in trainable if ".lora_" in n) == ["0.lora_A.2", "0.lora_B.2", "2.lora_A.2", "2.lora_B.2"]
    model(torch.randn(3, 7)).sum().backward()
    assert shared.grad is not None and shared.grad.shape == (3,) and (shared.grad != 0).all()
    # a model of the same structure with other adapter values loads the state exactly (the magnitudes once)
    copy = three_task_model(torch.float32)
    with torch.no_grad():
        copy.sdlora_magnitudes.magnitudes.fill_(5.0)
        copy[0].lora_B[0].normal_()
    load_adapter_state_dict(copy, state)
    x = torch.randn(2, 7)
    torch.testing.assert_close(copy(x), model(x), rtol=0, atol=0)
    assert lora_direction_parameters(model) == 3 * (2 * 7 + 5 * 2) + 3 * (2 * 5 + 3 * 2)  # 3 pairs per layer


def test_a_new_task_freezes_normalises_and_resets_every_magnitude_to_0_8():
    model = three_task_model(torch.float32)
    layer = model[2]
    with torch.no_grad():
        model.sdlora_magnitudes.magnitudes.copy_(torch.tensor([1.5, 0.1, 3.0]))
    a2, b2 = layer.lora_A[2].detach().clone(), layer.lora_B[2].detach().clone()
    x = torch.randn(5, 7)
    before = model(x)
    assert add_sdlora_task(model) == 4
    assert model.sdlora_magnitudes.magnitudes.tolist() == pytest.approx([0.8] * 4)
    assert model.sdlora_magnitudes.magnitudes.requires_grad
    assert not layer.lora_A[2].requires_grad and not layer.lora_B[2].requires_grad and layer.lora_B[3].requires_grad
    assert float(layer.direction_scale[2]) == pytest.approx(1.0 / float(a2.norm() * b2.norm()))
    assert float(layer.direction_scale[3]) == 1.0 and torch.count_nonzero(layer.lora_B[3]) == 0  # new pair: no-op
    # with the same magnitudes and the new pair at zero, the output is the normalised sum of the three pairs
    with torch.no_grad():
        model.sdlora_magnitudes.magnitudes.copy_(torch.tensor([1.5, 0.1, 3.0, 0.8]))
    assert not torch.allclose(model(x), before)  # pair 2 is now divided by its norms
    assert add_sdlora_task(nn.Sequential(nn.Linear(2, 2))) == 0


def cfg_for(**adapter):
    base = OmegaConf.merge(OmegaConf.load("conf/adapter/sdlora.yaml"), {"lr": None})  # lr: trainer.base_lr
    trainer = {"base_lr": 0.1, "betas": [0.9, 0.98], "weight_decay": 0.01, "warmup_ratio": 0.1, "epochs": 2,
               "optimizer_impl": "for_loop"}
    return OmegaConf.create({"adapter": OmegaConf.merge(base, adapter), "trainer": trainer})


def test_sgd_with_a_cosine_floor_and_the_adamw_option():
    model = three_task_model(torch.float32)
    (spec,) = get_method("sdlora").optimizers(model, cfg_for())
    opt = spec.build(spec.param_groups)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["weight_decay"] == 0
    sched = spec.schedule(opt, 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    import math

    floor = 0.625 * 0.1  # no warmup (official); lr(s) = floor + (peak - floor) (1 + cos(pi s / 10)) / 2
    assert lrs == pytest.approx([floor + (0.1 - floor) * (1 + math.cos(math.pi * s / 10)) / 2 for s in range(10)])
    assert opt.param_groups[0]["lr"] == pytest.approx(floor)
    (spec,) = get_method("sdlora").optimizers(model, cfg_for(optimizer="adamw", lr_schedule="linear"))
    opt = spec.build(spec.param_groups)
    assert isinstance(opt, torch.optim.AdamW) and spec.schedule is None and spec.warmup_ratio == 0.0
    (spec,) = get_method("sdlora").optimizers(model, cfg_for(lr=0.7))  # adapter.lr wins over trainer.base_lr
    assert spec.build(spec.param_groups).param_groups[0]["lr"] == 0.7


def test_first_task_has_its_own_epochs_and_lr():
    method = get_method("sdlora")
    cfg = cfg_for(init_epochs=5, init_lr=0.3)
    first, later = method.task_config(cfg, 0), method.task_config(cfg, 1)
    assert (first.trainer.epochs, first.adapter.lr) == (5, 0.3)
    assert (later.trainer.epochs, later.adapter.lr) == (2, None) and later is cfg
    model = three_task_model(torch.float32)
    (spec,) = method.optimizers(model, first)
    assert spec.build(spec.param_groups).param_groups[0]["lr"] == 0.3
    assert method.task_config(cfg_for(), 0) is not None and method.task_config(cfg_for(), 0).trainer.epochs == 2


# --------------------------------------------------------------------------------------------- main.py
TINY = ["dataset=clinc150_cl", "model=tiny-random-bert", "dataset.num_tasks=3", "dataset.max_train_per_class=6",
        "dataset.max_eval_per_class=4", "trainer.batch_size=16", "trainer.eval_batch_size=64", "trainer.epochs=2",
        "trainer.save_every_steps=3", "trainer.log_every_steps=2", "+cl_method=sdlora", "adapter.lr=0.05",
        "adapter.init_epochs=3", "adapter.init_lr=0.1"]
KILL = "+trainer.callbacks.kill._target_=tests._continual_helpers.KillInTask"


@pytest.fixture(scope="module")
def sdlora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sdlora")
    proc = run_main(TINY + [f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_sdlora_run_keeps_every_adapter_and_trains_the_first_task_longer(sdlora_run):
    metrics = read_json(sdlora_run / "metrics.json")
    assert [len(r) for r in metrics["acc_matrix"]] == [1, 2, 3]
    assert (metrics["active_adapters"], metrics["total_adapters"]) == (3, 3) and len(metrics["magnitudes"]) == 3
    steps = [read_json_lines(sdlora_run / "metrics.jsonl")[t]["steps"] for t in range(3)]
    assert steps == [3 * 6, 2 * 6, 2 * 6]  # 90 examples / 16 = 6 steps per epoch; task 0: init_epochs=3
    log = (sdlora_run / "main.log").read_text()
    assert "[SD-LoRA] Task 2 - magnitudes: [" in log and "Task 0, Epoch 3/3" in log and "Task 1, Epoch 2/2" in log


def read_json_lines(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("task", "step"), [(1, 4), (0, -1)])
def test_sdlora_killed_and_resumed_equals_uninterrupted(sdlora_run, tmp_path, task, step):
    killed = run_main(TINY + [KILL, f"+trainer.callbacks.kill.task={task}", f"+trainer.callbacks.kill.step={step}",
                              f"hydra.run.dir={tmp_path}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_main(TINY + ["resume=auto", f"hydra.run.dir={tmp_path}"])
    assert resumed.returncode == 0, resumed.stderr
    mine, theirs = read_json(tmp_path / "metrics.json"), read_json(sdlora_run / "metrics.json")
    for key in ("acc_matrix", "magnitudes", "acc_final", "forgetting", "adapter_params"):
        assert mine[key] == theirs[key]
    assert (tmp_path / "adapter" / "adapter_state.safetensors").read_bytes() == \
        (sdlora_run / "adapter" / "adapter_state.safetensors").read_bytes()


@pytest.mark.parametrize(("override", "message"), [
    ("adapter.optimizer=adam", "adapter.optimizer must be one of sgd, adamw (got 'adam')"),
    ("adapter.min_lr_ratio=1.5", "adapter.min_lr_ratio must be in [0, 1] (got 1.5)"),
    ("adapter.init_epochs=0", "adapter.init_epochs must be null or > 0 (got 0)"),
])
def test_bad_sdlora_values_fail_with_one_line(tmp_path, override, message):
    proc = run_main(TINY + [override, f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 1
    assert_one_line_error(proc, message)


def test_cl_method_presets_sdlora_and_the_gated_variant():
    from trainers.cli.schemas import validate_config

    faithful = compose_config(["dataset=clinc150_cl", "+cl_method=sdlora"])
    gated = compose_config(["dataset=clinc150_cl", "+cl_method=sdlora_gated"])
    validate_config(faithful)
    validate_config(gated)
    adapter = faithful.adapter
    assert (adapter.name, adapter.r, adapter.lora_dropout, list(adapter.target_modules)) == \
        ("sdlora", 10, 0.0, ["query", "value"])
    assert (adapter.magnitude_init, adapter.optimizer, adapter.momentum, adapter.lr_schedule) == \
        (0.8, "sgd", 0.9, "cosine")
    assert (gated.adapter.name, gated.adapter.lambda_sparsity, gated.adapter.conditional_growth) == \
        ("gumbel", 0.0, False)
