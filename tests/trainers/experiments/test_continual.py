"""Continual learning pieces: task splits, growth decisions and beta files, the head mask, frozen directions,
the metrics arithmetic, the tau schedule."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from _config import CONF
from omegaconf import OmegaConf
from torch import nn

from adapters import (
    GumbelLinear,
    adapter_layers,
    add_gumbel_task,
    gumbel_betas,
    lora_direction_parameters,
    wrap_linears,
)
from trainers.core.errors import UserError
from trainers.data.continual import build_continual_data, cap_per_class, task_split
from trainers.experiments.continual import HeadMask
from trainers.methods.gumbel import GumbelTemperature, conditional_growth, growth_decision
from trainers.reports.continual import (
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
    plot_accuracy_matrix,
    summarize,
)

DATA_ROOT = os.environ["DATA_ROOT"]


def dataset_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF / "dataset" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


class WordTokenizer:
    """A stand-in tokenizer: one id per word (the splits do not depend on the tokenizer)."""

    def __call__(self, texts, truncation=True, max_length=32):
        ids = [[hash(w) % 1000 for w in t.split()][:max_length] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}


# --------------------------------------------------------------------------------------------- splits
def test_task_split_is_a_disjoint_cover_in_chunks():
    tasks = task_split(150, 15)
    assert len(tasks) == 10 and all(len(t) == 15 for t in tasks)
    assert tasks[3] == list(range(45, 60))  # natural order: consecutive label ids
    shuffled = task_split(77, 11, order_seed=0)
    flat = [c for t in shuffled for c in t]
    assert sorted(flat) == list(range(77)) and len(shuffled) == 7 and flat != list(range(77))
    assert task_split(77, 11, order_seed=0) == shuffled and task_split(77, 11, order_seed=1) != shuffled
    assert task_split(150, 15, num_tasks=3) == tasks[:3]


@pytest.mark.parametrize(("args", "message"), [((150, 14), "does not divide"), ((150, 15, 11), "only 10 tasks")])
def test_task_split_errors(args, message):
    with pytest.raises(UserError, match=message):
        task_split(*args)


def test_clinc150_tasks_are_its_domains_and_counts_are_right():
    data = build_continual_data(dataset_cfg("clinc150_cl", max_train_per_class=5), DATA_ROOT, WordTokenizer())
    domains = json.loads((Path(DATA_ROOT) / "clinc150" / "domains.json").read_text())
    assert len(data.tasks) == 10
    for task, intents in zip(data.tasks, domains.values(), strict=True):
        assert [data.label_names[c] for c in task] == list(intents)
    for t in range(10):
        td = data.task_data(t)
        labels = [ex["labels"] for ex in td.train]
        assert set(labels) == set(data.tasks[t]) and len(labels) == 15 * 5  # 5 per class after the cap
        assert {ex["labels"] for ex in td.eval} == set(data.tasks[t]) and len(td.eval) == 300  # CLINC val: 20/intent
        assert data.seen(t) == [c for task in data.tasks[: t + 1] for c in task]


def test_banking77_split_is_seeded_7_tasks_of_11():
    data = build_continual_data(dataset_cfg("banking77_cl", num_tasks=7), DATA_ROOT, WordTokenizer())
    assert [len(t) for t in data.tasks] == [11] * 7
    assert sorted(c for t in data.tasks for c in t) == list(range(77))
    assert data.tasks == task_split(77, 11, order_seed=0)
    assert sum(len(data.task_eval(t)) for t in range(7)) == 3080  # 40 per intent


def test_mnist_split_holds_out_a_fifth_of_each_digit():
    data = build_continual_data(dataset_cfg("mnist_cl"), DATA_ROOT)
    assert data.tasks == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]] and data.modality == "image"
    assert len(data.train) + len(data.eval) == 10_000
    assert abs(len(data.eval) - 2000) <= 5
    assert data.train[0]["image"].shape == (28, 28)


def test_cap_per_class_keeps_at_most_n_per_class():
    examples = [{"labels": i % 3, "i": i} for i in range(30)]
    kept = cap_per_class(examples, 4)
    assert sorted(ex["labels"] for ex in kept) == [0] * 4 + [1] * 4 + [2] * 4
    assert [ex["i"] for ex in kept] == sorted(ex["i"] for ex in kept)


# --------------------------------------------------------------------------------------------- metrics
MATRIX = [[0.9], [0.7, 0.8], [0.5, 0.6, 0.9]]


def test_metrics_on_a_hand_made_matrix():
    assert final_accuracy(MATRIX) == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert average_incremental_accuracy(MATRIX) == pytest.approx((0.9 + 0.75 + 2.0 / 3) / 3)
    # task 0: best 0.9 -> 0.5; task 1: best 0.8 -> 0.6
    assert forgetting(MATRIX) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.6)) / 2)
    # weighted by evaluation sizes 10, 30, 60
    assert final_accuracy(MATRIX, [10, 30, 60]) == pytest.approx((5 + 18 + 54) / 100)
    summary = summarize(MATRIX, [10, 30, 60])
    assert summary["acc_per_step"] == pytest.approx([0.9, (7 + 24) / 40, 0.77])
    assert summary["aaa"] == pytest.approx((0.9 + 31 / 40 + 0.77) / 3)
    assert forgetting([[0.4, 0.5, 0.6]]) == 0.0  # a joint run: one row, nothing to forget
    assert backward_transfer(MATRIX) == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    assert summary["bwt"] == pytest.approx(-0.3) and backward_transfer([[0.4, 0.5, 0.6]]) == 0.0


def test_forgetting_takes_the_max_over_every_row_and_is_never_negative():
    # task 0 improves after the first row (0.5 -> 0.8 -> 0.9 at the end); task 1 rises then drops
    matrix = [[0.5], [0.8, 0.6], [0.9, 0.7, 0.4], [0.9, 0.5, 0.3, 0.8]]
    # max over rows i >= j, the last one included: task 0: 0.9 - 0.9, task 1: 0.7 - 0.5, task 2: 0.4 - 0.3
    assert forgetting(matrix) == pytest.approx((0.0 + 0.2 + 0.1) / 3)
    # BWT is its own number: final - right after learning (task 0 gained 0.4, the others lost)
    assert backward_transfer(matrix) == pytest.approx(((0.9 - 0.5) + (0.5 - 0.6) + (0.3 - 0.4)) / 3)
    improving = [[0.2], [0.6, 0.7], [0.8, 0.9, 0.5]]
    assert forgetting(improving) == 0.0 and backward_transfer(improving) == pytest.approx((0.6 + 0.2) / 2)


def test_accuracy_matrix_plot_marks_every_task(tmp_path, monkeypatch):
    from trainers.core import plots

    figures = []
    real_save = plots.save_figure

    def keep(fig, path):
        figures.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr("trainers.reports.continual.save_figure", keep)
    path = plot_accuracy_matrix(MATRIX, tmp_path / "m.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    ax = figures[0].axes[0]
    assert list(ax.get_xticks()) == [0, 1, 2] and list(ax.get_yticks()) == [0, 1, 2]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["90", "70", "80", "50", "60", "90"])


# --------------------------------------------------------------------------------------------- growth
def tiny_gumbel_model(tasks: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    wrap_linears(model, ["0", "2"], adapter="gumbel", r=2, lora_alpha=4)
    for _ in range(tasks - 1):
        add_gumbel_task(model)
    return model


@pytest.mark.parametrize(("betas", "task", "threshold", "enabled", "keep"), [
    ([0.45, 0.55], 1, 0.1, True, True),
    ([0.15, 0.32, 0.48, 0.05], 3, 0.1, True, False),
    ([0.5, 0.4, 0.1], 2, 0.1, True, False),   # beta == threshold: pruned (keep needs beta > threshold)
    ([0.9, 0.0], 1, 0.1, False, True),        # growth disabled (SD-LoRA): always kept
    ([1.0], 0, 0.1, True, True),
])
def test_growth_decision(betas, task, threshold, enabled, keep):
    assert growth_decision(torch.tensor(betas), task, threshold, enabled) is keep


def test_conditional_growth_prunes_a_low_beta_and_saves_the_beta_file(tmp_path, caplog):
    model = tiny_gumbel_model(3)
    for layer in adapter_layers(model, GumbelLinear).values():
        layer.tau = 1.0
        layer.gate_logits.data = torch.tensor([2.0, 1.5, -3.0])  # sparsemax -> [0.75, 0.25, 0]
    cfg = OmegaConf.create({"growth_threshold": 0.1, "conditional_growth": True, "tau_final": 1.0,
                            "growth_score": "beta"})
    with caplog.at_level(logging.INFO, logger="trainers.methods.gumbel"):
        decided = conditional_growth(model, 2, cfg, tmp_path)
    assert decided["kept"] is False and decided["pruning_mask"] == [True, True, False]
    saved = torch.load(tmp_path / "beta_values_task_2.pt", weights_only=True)
    assert torch.allclose(saved["beta_values"], torch.tensor([0.75, 0.25, 0.0]))
    assert saved["pruning_mask"].tolist() == [True, True, False] and saved["layer_beta_values"].shape == (2, 3)
    assert all(not layer.active[2] for layer in adapter_layers(model, GumbelLinear).values())
    text = caplog.text
    assert "[Conditional Growth] Task 2 - Beta values: [0.7500 0.2500 0.0000]" in text
    assert "Current task beta: 0.0000, threshold: 0.1000" in text
    assert "Pruning adapter for task 2" in text and "Active adapters: 2/3 (66.7%)" in text
    # the pruned pair is not counted any more: 2 layers x 2 kept tasks x r (in + out)
    assert lora_direction_parameters(model) == 2 * (2 * 6 + 6 * 2) + 2 * (2 * 6 + 4 * 2)


def growth_cfg(**kw):
    return OmegaConf.create({"growth_threshold": 0.1, "conditional_growth": True, "tau_final": 0.5,
                             "growth_score": "contribution", **kw})


def set_gate(model, logits, magnitudes):
    for layer in adapter_layers(model, GumbelLinear).values():
        layer.gate_logits.data = torch.tensor(logits, dtype=layer.gate_logits.dtype)
        layer.magnitudes.data = torch.tensor(magnitudes, dtype=layer.magnitudes.dtype)


def test_growth_is_decided_at_tau_final_and_scores_contributions(tmp_path):
    # logits / 0.5 = [2.6, 2.2, 2.2]: sparsemax -> [0.6, 0.2, 0.2] at tau_final (at tau 5 it would be ~uniform)
    model = tiny_gumbel_model(3)
    set_gate(model, [1.3, 1.1, 1.1], [1.0, 1.0, 0.2])
    for layer in adapter_layers(model, GumbelLinear).values():
        layer.tau = 5.0
    decided = conditional_growth(model, 2, growth_cfg(), tmp_path)
    assert all(layer.tau == 0.5 for layer in adapter_layers(model, GumbelLinear).values())
    assert decided["beta_values"] == pytest.approx([0.6, 0.2, 0.2], abs=1e-6)
    # contribution shares: |beta alpha| = [0.6, 0.2, 0.04] / 0.84; adapter 2's share 0.0476 <= 0.1: pruned
    assert decided["growth_scores"] == pytest.approx([0.6 / 0.84, 0.2 / 0.84, 0.04 / 0.84], abs=1e-6)
    assert decided["kept"] is False and decided["pruning_mask"] == [True, True, False]
    saved = torch.load(tmp_path / "beta_values_task_2.pt", weights_only=True)
    assert {"beta_values", "pruning_mask", "layer_beta_values", "task", "threshold", "kept"} <= set(saved)
    # the seed's rule keeps it (beta 0.2 > 0.1)
    model = tiny_gumbel_model(3)
    set_gate(model, [1.3, 1.1, 1.1], [1.0, 1.0, 0.2])
    assert conditional_growth(model, 2, growth_cfg(growth_score="beta"), tmp_path)["kept"] is True


def test_old_adapters_with_beta_exactly_zero_are_dropped_and_outputs_do_not_change(tmp_path):
    model = tiny_gumbel_model(4).double()
    for layer in adapter_layers(model, GumbelLinear).values():
        for b in layer.lora_B:
            b.data.normal_()
    # at tau 0.5 logits [0.1, 1.0, 0.9, 0.2] / 0.5 = [0.2, 2, 1.8, 0.4]: sparsemax -> [0, 0.6, 0.4, 0]
    set_gate(model, [0.1, 1.0, 0.9, 0.2], [0.8, 0.8, 0.8, 0.8])
    model.eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    for layer in adapter_layers(model, GumbelLinear).values():
        layer.tau = 0.5
    before = model(x)
    decided = conditional_growth(model, 3, growth_cfg(growth_score="beta"), tmp_path)
    # the new adapter (3) fails the rule; the old adapter 0 has beta exactly 0 and goes too
    assert decided["kept"] is False and decided["dropped_zero_beta"] == [0]
    assert decided["pruning_mask"] == [False, True, True, False]
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    assert gumbel_betas(model)[0].tolist() == pytest.approx([0.0, 0.6, 0.4, 0.0])
    # growth disabled (the gated SD-LoRA variant): nothing is pruned, not even a beta of 0
    model = tiny_gumbel_model(4)
    set_gate(model, [0.1, 1.0, 0.9, 0.2], [0.8, 0.8, 0.8, 0.8])
    decided = conditional_growth(model, 3, growth_cfg(conditional_growth=False), tmp_path)
    assert decided["pruning_mask"] == [True] * 4 and decided["dropped_zero_beta"] == []


def test_gumbel_betas_are_noise_free_and_sum_to_one():
    model = tiny_gumbel_model(4)
    model.train()
    betas = gumbel_betas(model)
    assert betas.shape == (2, 4) and torch.equal(betas, gumbel_betas(model))
    assert torch.allclose(betas.sum(1), torch.ones(2))


def test_add_gumbel_task_freezes_and_normalises_the_earlier_direction():
    model = tiny_gumbel_model(1)
    layer = adapter_layers(model, GumbelLinear)["0"]
    layer.lora_B[0].data.normal_()
    a0, b0 = layer.lora_A[0].detach().clone(), layer.lora_B[0].detach().clone()
    assert add_gumbel_task(model) == 2
    assert not layer.lora_A[0].requires_grad and not layer.lora_B[0].requires_grad
    assert layer.direction_scale[0] == pytest.approx(1.0 / float(a0.norm() * b0.norm()))
    assert add_gumbel_task(nn.Sequential(nn.Linear(2, 2))) == 0  # no Gumbel layers: nothing to do


def test_tau_schedule():
    schedule = GumbelTemperature(5.0, 0.5, 0.999)
    assert schedule.tau(0) == 5.0
    assert schedule.tau(100) == pytest.approx(5.0 * 0.999 ** 100)
    assert schedule.tau(2302) == pytest.approx(max(0.5, 5.0 * 0.999 ** 2302)) and schedule.tau(5000) == 0.5


def test_tau_reaches_tau_final_at_the_end_of_each_task():
    schedule = GumbelTemperature(5.0, 0.5, None)
    schedule.total_steps = 85  # anneal_rate null: rate = (0.5 / 5) ** (1 / 85)
    rate = 0.1 ** (1 / 85)
    assert schedule.rate() == pytest.approx(rate)
    assert [schedule.tau(s) for s in (0, 40)] == pytest.approx([5.0, 5.0 * rate ** 40])
    assert schedule.tau(85) == 0.5 and schedule.tau(84) > 0.5
    schedule.total_steps = 10  # a shorter task anneals faster: the same end point
    assert schedule.tau(5) == pytest.approx(5.0 * 0.1 ** 0.5) and schedule.tau(10) == 0.5


# --------------------------------------------------------------------------------------------- head
def test_head_mask_hides_unseen_classes_and_their_gradients():
    model = nn.Module()
    model.classifier = nn.Linear(3, 6)
    mask = HeadMask(model, 6)
    mask.set_classes([2, 3], [0, 1, 2, 3])
    x = torch.randn(4, 3)
    logits = model.classifier(x)
    assert (logits[:, [0, 1, 4, 5]] == torch.finfo(logits.dtype).min).all()
    loss = nn.functional.cross_entropy(logits, torch.tensor([2, 3, 2, 3]))
    loss.backward()
    grad = model.classifier.weight.grad
    assert grad[[0, 1, 4, 5]].abs().sum() == 0 and grad[[2, 3]].abs().sum() > 0
    model.classifier.eval()
    logits = model.classifier(x)
    assert torch.isfinite(logits[:, :4]).all() and (logits[:, 4:] == torch.finfo(logits.dtype).min).all()


def test_cifar100_local_pickles_and_the_image_collator(tmp_path):
    import pickle

    import numpy as np

    from trainers.data.continual import make_image_collator

    base = tmp_path / "cifar100" / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("test", 200)):
        labels = [i % 100 for i in range(n)]
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        (base / split).write_bytes(pickle.dumps({"data": data, "fine_labels": labels}))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    data = build_continual_data(dataset_cfg("cifar100_cl", num_tasks=2), str(tmp_path))
    assert [len(t) for t in data.tasks] == [10, 10] and data.tasks[0] == task_split(100, 10, order_seed=1993)[0]
    assert {ex["labels"] for ex in data.task_data(1).train} == set(data.tasks[1])
    assert len(data.task_data(0).train) == 30 and data.train[0]["image"].shape == (32, 32, 3)
    batch = make_image_collator(48, 3)(data.train[:4])
    assert batch["pixel_values"].shape == (4, 3, 48, 48) and batch["labels"].tolist() == [ex["labels"] for ex in
                                                                                          data.train[:4]]
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
    gray = make_image_collator(28, 1)([{"image": np.full((28, 28), 255, np.uint8), "labels": 3}])
    assert torch.equal(gray["pixel_values"], torch.ones(1, 1, 28, 28))  # (1 - 0.5) / 0.5


def test_gate_logits_get_their_own_learning_rate_group():
    from omegaconf import OmegaConf

    from trainers.methods import get_method

    def base_optimizer(logit_lr):
        cfg = OmegaConf.create({"trainer": {"base_lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 0.01,
                                            "warmup_ratio": 0.1, "optimizer_impl": "for_loop"},
                                "adapter": {"gate_logit_lr": logit_lr}})
        (spec,) = get_method("gumbel").optimizers(model, cfg)
        return spec.build(spec.param_groups)

    model = tiny_gumbel_model(2)
    base_opt = base_optimizer(0.05)
    assert len(base_opt.param_groups) == 2
    logits = {id(layer.gate_logits) for layer in adapter_layers(model, GumbelLinear).values()}
    group = base_opt.param_groups[1]
    assert {id(p) for p in group["params"]} == logits and group["lr"] == 0.05 and group["weight_decay"] == 0.0
    assert not logits & {id(p) for p in base_opt.param_groups[0]["params"]}
    plain = base_optimizer(None)  # without logit_lr: one group, as before
    assert len(plain.param_groups) == 1 and logits <= {id(p) for p in plain.param_groups[0]["params"]}


# --------------------------------------------------------------------------------------------- global gate
def global_gate_model(tasks: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    wrap_linears(model, ["0", "2"], adapter="gumbel", r=2, lora_alpha=4, gate="global")
    for _ in range(tasks - 1):
        add_gumbel_task(model)
    return model


def test_a_global_gate_is_one_parameter_and_one_sample_per_forward(tmp_path):
    from adapters import adapter_state_dict

    model = global_gate_model(3)
    layers = list(adapter_layers(model, GumbelLinear).values())
    logit_names = [n for n, p in model.named_parameters() if n.endswith("gate_logits")]
    assert logit_names == ["gumbel_gate.gate_logits"] and model.gumbel_gate.gate_logits.shape == (3,)
    assert [k for k in adapter_state_dict(model) if "gate_logits" in k] == ["gumbel_gate.gate_logits"]
    model.gumbel_gate.gate_logits.data = torch.tensor([0.3, -0.2, 0.1])
    model.train()
    model(torch.randn(2, 6))
    first = layers[0].last_beta
    assert layers[1].last_beta is first  # both layers used the same Gumbel sample
    model(torch.randn(2, 6))
    assert not torch.equal(layers[0].last_beta, first) and layers[1].last_beta is layers[0].last_beta
    # the gradient of the shared logits collects both layers'
    (model(torch.randn(2, 6)).sum() + sum(layer.magnitudes.sum() for layer in layers)).backward()
    assert model.gumbel_gate.gate_logits.grad is not None
    # the decision sees one beta vector: every layer's row is the same, and pruning is the same everywhere
    for layer in layers:
        layer.tau = 1.0
    model.gumbel_gate.gate_logits.data = torch.tensor([2.0, 1.5, -3.0])
    decided = conditional_growth(model, 2, growth_cfg(tau_final=1.0, growth_score="beta"), tmp_path)
    betas = gumbel_betas(model)
    assert torch.equal(betas[0], betas[1]) and decided["pruning_mask"] == [True, True, False]
    assert all(layer.active.tolist() == [True, True, False] for layer in layers)
    # the structure of a later task is rebuilt by add_gumbel_task (the shared logits grow with it)
    assert add_gumbel_task(model) == 4 and model.gumbel_gate.gate_logits.shape == (4,)
    with pytest.raises(ValueError, match="gate must be one of layer, global"):
        wrap_linears(nn.Sequential(nn.Linear(2, 2)), ["0"], adapter="gumbel", gate="model")
