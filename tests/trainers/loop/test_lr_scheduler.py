"""trainer.lr_scheduler (transformers' schedules), the trainer.callbacks={...} form and the on_log hook."""

from __future__ import annotations

import math

import pytest
from _config import TINY_RUN, compose_config
from _trainer_helpers import jsonl

from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError
from trainers.experiments.single import train_run
from trainers.loop.checkpoint import config_differences


def make(overrides):
    return compose_config(TINY_RUN + list(overrides))



pytestmark = pytest.mark.usefixtures("one_thread")  # small runs on one thread (conftest.py)


def train_lrs(path):
    return {r["step"]: r["lr"] for r in jsonl(path) if r["split"] == "train"}


def test_cosine_schedule_follows_its_formula(tmp_path):
    # 10 steps (80 examples, batch 8), warmup int(0.2 x 10) = 2 steps, then half a cosine down to 0
    train_run(make(["trainer.lr_scheduler=cosine", "trainer.warmup_ratio=0.2", "trainer.log_every_steps=1",
                    "dataset.max_train_samples=80"]), tmp_path)
    lrs = train_lrs(tmp_path)
    assert sorted(lrs) == list(range(1, 11))
    for step, lr in lrs.items():  # the lr after `step` scheduler steps
        want = 1e-3 * (step / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 8)))
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), step


def test_default_is_linear_warmup_then_linear_decay(tmp_path):
    train_run(make(["trainer.warmup_ratio=0.2", "trainer.log_every_steps=1", "dataset.max_train_samples=80"]), tmp_path)
    lrs = train_lrs(tmp_path)
    for step, lr in lrs.items():
        want = 1e-3 * (step / 2 if step < 2 else (10 - step) / 8)
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), step


def test_scheduler_kwargs_reach_the_schedule(tmp_path):
    train_run(make(["trainer.lr_scheduler=cosine_with_min_lr", "trainer.warmup_ratio=0.0",
                    "trainer.lr_scheduler_kwargs={min_lr_rate: 0.1}", "trainer.log_every_steps=1"]), tmp_path)
    lrs = train_lrs(tmp_path)  # 5 steps
    assert lrs[5] == pytest.approx(1e-4, rel=1e-9)  # ends at min_lr_rate x lr instead of 0


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.lr_scheduler=cosine_annealing"], r"^trainer.lr_scheduler must be one of linear, cosine, .*"
                                                r"\(got 'cosine_annealing'\)$"),
    (["trainer.lr_scheduler=reduce_lr_on_plateau"], r"^trainer.lr_scheduler must be one of .*"),
    (["trainer.lr_scheduler=cosine", "trainer.lr_scheduler_kwargs={bogus: 1}"],
     r"^trainer.lr_scheduler cosine does not take lr_scheduler_kwargs \{'bogus': 1\}: .*"),
])
def test_bad_scheduler_is_one_line_error(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        validate_config(make(overrides))
    assert "\n" not in str(info.value)


def test_checkpoints_from_before_the_key_still_match_the_default():
    saved = {"trainer.base_lr": 1e-3}
    assert config_differences(saved, {"trainer.base_lr": 1e-3, "trainer.lr_scheduler": "linear",
                                      "trainer.lr_scheduler_kwargs": None}) == []
    assert config_differences(saved, {"trainer.base_lr": 1e-3, "trainer.lr_scheduler": "cosine",
                                      "trainer.lr_scheduler_kwargs": None}) == [
        "trainer.lr_scheduler='linear' -> 'cosine'"]


def test_callbacks_given_as_one_dict_and_on_log_sees_every_record(tmp_path):
    train_run(make(["trainer.callbacks={rec: {_target_: _trainer_helpers.Recorder}}"]), tmp_path)
    from _trainer_helpers import Recorder, jsonl

    calls = Recorder.last.calls
    assert calls.count("on_log") == len(jsonl(tmp_path)) > 0
    assert calls[calls.index("on_evaluate") - 1] == "on_log"  # the eval record is logged before on_evaluate
