"""Experiment trackers (the ``logger`` group): every metrics.jsonl record reaches the tracker, the config is stored
as hyperparameters, and a tracker changes nothing about the training itself."""

from __future__ import annotations

import csv
import json
import math
import time

import pytest
import yaml
from _config import TINY_RUN, compose_config
from _trainer_helpers import jsonl, without_timings

from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError
from trainers.experiments.single import train_run
from trainers.loop import trackers


def make(overrides):
    return compose_config(TINY_RUN + list(overrides))



pytestmark = pytest.mark.usefixtures("one_thread")  # small runs on one thread (conftest.py)


def expected_scalars(records: list[dict]) -> dict[str, dict[int, float]]:
    """tag -> step -> value, as the tracker should have received the metrics.jsonl records."""
    want: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key in ("step", "split") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            want.setdefault(f"{record['split']}/{key}", {})[record["step"]] = float(value)
    return want


def test_tensorboard_gets_every_record_and_the_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain, tracked = tmp_path / "plain", tmp_path / "tb"
    metrics_plain = train_run(make([]), plain)
    metrics = train_run(make(["logger=tensorboard", "adapter.r=4"]), tracked)
    records = jsonl(tracked)
    # the tracker changes nothing about the run (the r=4 run is compared with an r=4 run below)
    assert not (plain / "tensorboard").exists()
    assert metrics_plain["trainable_params"] != metrics["trainable_params"]

    events = EventAccumulator(str(tracked / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    got = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    want = expected_scalars(records)
    assert {"train/loss", "train/accuracy", "train/lr", "eval/eval_accuracy", "eval/eval_loss"} <= set(want)
    for tag, by_step in want.items():
        assert set(got[tag]) == set(by_step), tag
        for step, value in by_step.items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)
    assert got["final/eval_accuracy"] == {metrics["global_step"]: pytest.approx(metrics["eval_accuracy"])}

    hparams = yaml.safe_load(next((tracked / "tensorboard").glob("*/hparams.yml")).read_text())
    assert hparams["adapter.r"] == 4 and hparams["adapter.name"] == "lora"
    assert hparams["trainer.batch_size"] == 8 and hparams["logger.name"] == "tensorboard"
    assert json.loads(hparams["trainer.betas"]) == [0.9, 0.98]


def test_a_tracker_does_not_change_the_run(tmp_path):
    a = train_run(make([]), tmp_path / "a")
    b = train_run(make(["logger=csv"]), tmp_path / "b")
    assert without_timings(a) == without_timings(b)
    assert jsonl(tmp_path / "a") == jsonl(tmp_path / "b")


def test_csv_logger_writes_every_record(tmp_path):
    train_run(make(["logger=csv", "logger.project=logs"]), tmp_path)
    records = jsonl(tmp_path)
    with (tmp_path / "logs" / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records) + 1  # + the final line
    for row, record in zip(rows, records, strict=False):
        assert int(row["step"]) == record["step"]
        for tag, by_step in expected_scalars([record]).items():
            assert math.isclose(float(row[tag]), by_step[record["step"]], rel_tol=1e-12)
    assert "final/status" not in rows[-1] and float(rows[-1]["final/global_step"]) == records[-1]["step"]
    hparams = json.loads((tmp_path / "logs" / "hparams.json").read_text())
    assert hparams["seed"] == 42 and hparams["logger.project"] == "logs"


def test_csv_tracker_drops_rows_an_interrupted_run_logged_after_its_checkpoint(tmp_path):
    first = trackers.CSVTracker()
    first.configure(tmp_path, "csv")
    first.start()
    for step in (1, 2, 3, 4):
        first.log({"train/loss": float(step)}, step=step)
    resumed = trackers.CSVTracker()  # the run resumes from its checkpoint at step 2
    resumed.configure(tmp_path, "csv")
    resumed.start()
    resumed.log({"train/loss": 30.0, "train/lr": 0.5}, step=3)
    with (tmp_path / "csv" / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["step"], r["train/loss"], r["train/lr"]) for r in rows] == [
        ("1", "1.0", ""), ("2", "2.0", ""), ("3", "30.0", "0.5")]


def test_csv_tracker_resuming_a_continual_task_keeps_the_earlier_tasks(tmp_path):
    first = trackers.CSVTracker()
    first.configure(tmp_path, "csv")
    first.start()
    for task in (0, 1):
        for step in (1, 2):
            first.log({f"task_{task}/train/loss": float(step)}, step=step)
        first.log({"task/steps": 2.0}, step=task)
    resumed = trackers.CSVTracker()  # resumed inside task 1, from its checkpoint at step 1
    resumed.configure(tmp_path, "csv")
    resumed.start()
    resumed.log({"task_1/train/loss": 20.0}, step=2)
    with (tmp_path / "csv" / "metrics.csv").open(newline="") as fh:
        rows = [{k: v for k, v in row.items() if v} for row in csv.DictReader(fh)]
    assert rows == [{"step": "1", "task_0/train/loss": "1.0"}, {"step": "2", "task_0/train/loss": "2.0"},
                    {"step": "0", "task/steps": "2.0"}, {"step": "1", "task_1/train/loss": "1.0"},
                    {"step": "1", "task/steps": "2.0"}, {"step": "2", "task_1/train/loss": "20.0"}]


def test_continual_run_logs_each_task_under_its_prefix(tmp_path):
    from _trainer_helpers import run_main

    run = tmp_path / "run"
    proc = run_main(["dataset=clinc150_cl", "model=tiny-random-bert", "dataset.num_tasks=2",
                     "dataset.max_train_per_class=4", "dataset.max_eval_per_class=2", "trainer.batch_size=16",
                     "trainer.log_every_steps=2", "logger=csv", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    with (run / "csv" / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = set(rows[0])
    assert {"task_0/train/loss", "task_1/train/loss", "task_0/eval/eval_accuracy", "task_1/eval/eval_accuracy",
            "task/steps", "final/acc_final", "final/forgetting"} <= columns
    final = json.loads((run / "metrics.json").read_text())
    assert float(rows[-1]["final/acc_final"]) == pytest.approx(final["acc_final"])


def test_tracker_values_keep_numbers_only():
    record = {"step": 3, "split": "train", "stage": "train", "loss": 0.5, "flag": True, "bad": float("nan"), "n": 2}
    assert trackers.tracker_values(record, "task_1/") == {"task_1/train/loss": 0.5, "task_1/train/n": 2}


def test_flat_hparams():
    flat = trackers.flat_hparams({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "f": "x"})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "a.d": "null", "a.e": "{}", "f": "x"}


def test_a_tracker_that_cannot_start_is_one_line_error(tmp_path, monkeypatch):
    from accelerate import Accelerator

    def broken(*args, **kwargs):
        raise RuntimeError("no server at http://nowhere\nmore detail")

    monkeypatch.setattr(Accelerator, "init_trackers", broken)
    with pytest.raises(UserError, match=r"^logger=csv could not start: no server at http://nowhere$"):
        train_run(make(["logger=csv"]), tmp_path)


def test_unknown_tracker_is_one_line_error():
    with pytest.raises(UserError, match=r"^logger.name must be one of none, csv, tensorboard, wandb, mlflow"):
        validate_config(make(["logger.name=comet"]))


def test_missing_tracker_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(trackers.TRACKER_PACKAGES, "wandb", "no_such_package_for_lora_lab")
    with pytest.raises(UserError, match=r"^logger=wandb needs the no_such_package_for_lora_lab package: pip install "
                                        r"no_such_package_for_lora_lab \(or this project's \[wandb\] extra\)$"):
        trackers.check_tracker("wandb")


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_run(make(["logger=wandb"]), tmp_path)
    (record_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # one run, under the run folder
    keys = (b"train/loss", b"eval/eval_accuracy", b"final/eval_accuracy", b"adapter.r", b"lora-lab")
    for _ in range(50):  # wandb's writer process may still be flushing the file when finish() returns
        records = record_file.read_bytes()  # protobuf records: the keys are stored as plain text
        if all(key in records for key in keys):
            break
        time.sleep(0.2)
    assert [key for key in keys if key not in records] == []


def test_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database store unless told so
    metrics = train_run(make(["logger=mlflow", "logger.project=exp1"]), tmp_path / "run")
    (run,) = [p for p in (tmp_path / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    lines = (run / "metrics" / "eval" / "eval_accuracy").read_text().split()  # "<time> <value> <step>"
    assert float(lines[-2]) == pytest.approx(metrics["eval_accuracy"]) and int(lines[-1]) == metrics["global_step"]
    assert (run / "params" / "adapter.r").read_text() == "8"
    assert (run / "tags" / "mlflow.runName").read_text() == "run"


def test_trackers_are_documented():
    from _config import REPO

    doc = (REPO / "README.md").read_text()
    assert "logger=tensorboard" in doc
    for key in ("name", "project", "init_kwargs"):
        assert f"`logger.{key}`" in doc


def test_sweep_gives_one_tensorboard_run_per_job(tmp_path):
    pytest.importorskip("tensorboard")
    from _trainer_helpers import TINY, run_main
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sweep = tmp_path / "sweep"
    proc = run_main(["-m", *TINY, "dataset.max_train_samples=16", "logger=tensorboard", "adapter.r=2,4",
                     f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job in ("0", "1"):
        events = EventAccumulator(str(sweep / job / "tensorboard")).Reload()
        last = jsonl(sweep / job)[-1]
        assert last["split"] == "eval"
        assert events.Scalars("eval/eval_accuracy")[-1].value == pytest.approx(last["eval_accuracy"])
