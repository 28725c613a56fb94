"""Values that cannot work are refused with one line before anything runs: non-finite numbers anywhere in the
config, and a max_seq_length that leaves no room for text."""

from __future__ import annotations

from pathlib import Path

import pytest
from _config import compose_config

from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError

CONF = Path(__file__).resolve().parents[3] / "conf"


def make(overrides: list[str]):
    return compose_config(["model=tiny-random-bert", *overrides])


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.base_lr=inf"], "trainer.base_lr must be a finite number (got inf)"),
    (["trainer.weight_decay=inf"], "trainer.weight_decay must be a finite number (got inf)"),
    (["trainer.max_grad_norm=nan"], "trainer.max_grad_norm must be a finite number (got nan)"),
    (["trainer.warmup_ratio=nan"], "trainer.warmup_ratio must be a finite number (got nan)"),
    (["sparse_lambda=inf"], "sparse_lambda must be a finite number (got inf)"),
    (["adapter.lora_alpha=-inf"], "adapter.lora_alpha must be a finite number (got -inf)"),
    (["adapter=sora", "adapter.gate_lr=inf"], "adapter.gate_lr must be a finite number (got inf)"),
    (["adapter=sora", "schedule=xi_stages", "schedule.xi_max=inf"],
     "schedule.xi_max must be a finite number (got inf)"),
    (["adapter=sora", "schedule=xi_stages", "schedule.xi_step=nan"], "schedule.xi_step must be a finite number"),
    (["trainer.betas=[0.9,nan]"], "trainer.betas must hold finite numbers (got [0.9, nan])"),
])
def test_non_finite_values_are_refused(overrides, message):
    with pytest.raises(UserError) as info:
        validate_config(make(overrides))
    assert str(info.value) == message or str(info.value).startswith(message)


def test_finite_values_still_pass():
    validate_config(make(["trainer.base_lr=1e6", "sparse_lambda=0.5", "adapter=sora"]))


def test_user_callback_arguments_may_be_infinite():
    validate_config(make(["+trainer.callbacks.x._target_=trainers.loop.hooks.TrainerCallback",
                          "+trainer.callbacks.x.limit=inf"]))


def test_max_seq_length_must_leave_room_for_text():
    from trainers.data.readers import tokenize
    from trainers.models.loading import load_tokenizer

    tokenizer = load_tokenizer(make([]).model)  # MiniLM's BERT tokenizer: [CLS] text [SEP]
    rows = [("a rather long sentence that needs truncating", 1)]
    for length in (0, 1, 2):
        with pytest.raises(UserError, match=f"dataset.max_seq_length={length} leaves no room for text: the tokenizer "
                                            "adds 2 special token\\(s\\) per example; use at least 3"):
            tokenize(rows, tokenizer, length)
    assert len(tokenize(rows, tokenizer, 3)[0]["input_ids"]) == 3  # really cut to 3 (it used to stay at 10)
    pair = [(("first sentence here", "second one"), 0)]
    pair_message = "adds 3 special token\\(s\\) per example \\(a sentence pair\\); use at least 5"
    with pytest.raises(UserError, match=pair_message):
        tokenize(pair, tokenizer, 4)
    assert len(tokenize(pair, tokenizer, 5)[0]["input_ids"]) == 5


@pytest.mark.parametrize(("target", "message"), [
    ("os.system", "trainer.callbacks.bad: os.system is not a class"),
    ("collections.OrderedDict", "trainer.callbacks.bad: collections.OrderedDict is not a "
                                "trainers.loop.hooks.TrainerCallback subclass"),
    ("no_such_module.Thing", "trainer.callbacks.bad: no_such_module.Thing is not a class"),
])
def test_callback_targets_are_checked_before_they_are_called(target, message, tmp_path):
    from trainers.experiments.session import user_callbacks

    marker = tmp_path / "called"
    cfg = make([f"+trainer.callbacks.bad._target_={target}", f"+trainer.callbacks.bad._args_=['touch {marker}']"])
    with pytest.raises(UserError) as info:
        user_callbacks(cfg)
    assert str(info.value).startswith(message)
    assert not marker.exists()  # os.system was never called


def test_a_callback_class_is_built():
    from trainers.experiments.session import user_callbacks
    from trainers.loop.hooks import TrainerCallback

    built = user_callbacks(make(["+trainer.callbacks.ok._target_=trainers.loop.hooks.TrainerCallback"]))
    assert len(built) == 1 and type(built[0]) is TrainerCallback
