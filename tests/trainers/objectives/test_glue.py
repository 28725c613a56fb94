"""GLUE: the offline task files, sentence-pair encoding, the metrics against hand-computed values, and tiny
end-to-end runs (regression on STS-B, F1 on MRPC, Matthews correlation on CoLA)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from _config import compose_config
from _glue_helpers import KeepEvalOutputs

from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError
from trainers.data.readers import GLUE_TASKS, load_raw, read_glue_tsv, tokenize
from trainers.experiments.single import train_run
from trainers.objectives.metrics import f1, matthews_correlation, pearson, spearman, task_metrics

DATA_ROOT = os.environ["DATA_ROOT"]
CONF = Path(__file__).resolve().parents[3] / "conf"


pytestmark = pytest.mark.usefixtures("one_thread")  # small runs on one thread (conftest.py)


# --------------------------------------------------------------------------------------------- metrics
def test_matthews_correlation_by_hand():
    labels = [1, 1, 1, 1, 0, 0, 0, 1, 0, 1]
    preds = [1, 1, 0, 1, 0, 1, 0, 1, 1, 1]
    tp, tn, fp, fn = 5, 2, 2, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 8 / sqrt(1008)
    assert matthews_correlation(preds, labels) == pytest.approx(expected, abs=1e-12)
    assert matthews_correlation([1] * 4, [0, 1, 0, 1]) == 0.0  # a constant prediction: a zero factor


def test_f1_and_accuracy_by_hand():
    labels = [1, 0, 1, 1, 0, 0, 1]
    preds = [1, 1, 0, 1, 0, 1, 1]
    tp, fp, fn = 3, 2, 1
    out = task_metrics("f1", preds, labels)
    assert out["eval_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)  # 6 / 9
    assert out["eval_accuracy"] == pytest.approx(4 / 7, abs=1e-12)
    assert out["eval_score"] == out["eval_f1"]
    assert task_metrics("f1_accuracy", preds, labels)["eval_score"] == pytest.approx(4 / 7)  # QQP: accuracy
    assert f1([0, 0], [0, 0]) == 0.0


def test_pearson_and_spearman_by_hand():
    labels = [0.0, 1.0, 2.5, 4.0, 5.0]
    preds = [0.5, 0.4, 3.0, 3.5, 6.0]
    x, y = np.array(preds, dtype=np.float64), np.array(labels, dtype=np.float64)
    cov = ((x - x.mean()) * (y - y.mean())).sum()
    expected = cov / math.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert pearson(preds, labels) == pytest.approx(expected, abs=1e-12)
    # ranks: preds 2 1 3 4 5, labels 1 2 3 4 5 -> d^2 = 1 + 1 -> 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman(preds, labels) == pytest.approx(0.9, abs=1e-12)
    out = task_metrics("pearson", preds, labels)
    assert out["eval_score"] == out["eval_pearson"] and "eval_accuracy" not in out
    assert math.isnan(pearson([1.0, 1.0, 1.0], labels[:3]))


def test_main_metric_per_task():
    assert {name: task.metric for name, task in GLUE_TASKS.items()} == {
        "cola": "matthews", "mrpc": "f1", "rte": "accuracy", "stsb": "pearson", "qnli": "accuracy",
        "mnli": "accuracy", "qqp": "f1_accuracy"}
    with pytest.raises(ValueError, match="unknown metric family"):
        task_metrics("bleu", [1], [1])


# --------------------------------------------------------------------------------------------- readers
@pytest.mark.parametrize(("task", "train", "dev", "labels"), [
    ("cola", 8551, 1043, {0: 322, 1: 721}),
    ("mrpc", 3667, 408, {0: 129, 1: 279}),
    ("rte", 2490, 277, None),
    ("stsb", 5749, 1500, None),
])
def test_offline_glue_files(task, train, dev, labels):
    raw = load_raw(task, DATA_ROOT)
    assert (len(raw.train), len(raw.eval)) == (train, dev)
    if labels is not None:
        assert {y: sum(1 for _, v in raw.eval if v == y) for y in labels} == labels
    single = task == "cola"
    assert all(isinstance(t, str) if single else (isinstance(t, tuple) and len(t) == 2) for t, _ in raw.train)
    assert raw.regression == (task == "stsb")


def test_first_rows_as_the_files_hold_them():
    cola = load_raw("cola", DATA_ROOT)  # no header: the first line is an example
    assert cola.train[0] == ("Our friends won't buy this analysis, let alone the next one we propose.", 1)
    mrpc = load_raw("mrpc", DATA_ROOT)  # the BOM before "Quality" is dropped, so the columns are found
    assert mrpc.train[0][1] == 1 and mrpc.train[0][0][0].startswith("Amrozi accused his brother")
    rte = load_raw("rte", DATA_ROOT)
    assert rte.eval[0] == (("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
                            "according to the Christopher Reeve Foundation.", "Christopher Reeve had an accident."), 1)
    stsb = load_raw("stsb", DATA_ROOT)
    assert stsb.eval[1] == (("A young child is riding a horse.", "A child is riding a horse."), 4.75)
    assert all(isinstance(y, float) and 0.0 <= y <= 5.0 for _, y in stsb.train)


def test_bad_glue_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "dev.tsv"
    bad.write_text("index\tsentence1\tsentence2\tscore\n0\ta\tb\tfive\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 2: score 'five' is not a number"):
        read_glue_tsv(GLUE_TASKS["stsb"], bad)
    bad.write_text("index\tsentence1\tlabel\n0\ta\tentailment\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"has no column 'sentence2'"):
        read_glue_tsv(GLUE_TASKS["rte"], bad)
    (tmp_path / "glue" / "rte").mkdir(parents=True)
    with pytest.raises(UserError, match="missing data file"):
        load_raw("rte", str(tmp_path))


def test_hub_only_tasks_say_what_failed(tmp_path):
    with pytest.raises(UserError) as err:  # HF_DATASETS_OFFLINE=1: the Hub fallback fails
        load_raw("qnli", str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "glue/qnli does not exist and the Hugging Face Hub failed" in message


def test_pairs_are_encoded_as_pairs():
    from trainers.models.loading import load_tokenizer

    tokenizer = load_tokenizer(compose_cfg(["model=tiny-random-bert"]).model)
    rows = [(("A man is dancing.", "A person dances."), 3.5), (("Short.", "x " * 200), 1.0)]
    encoded = tokenize(rows, tokenizer, max_length=32)
    expected = tokenizer("A man is dancing.", "A person dances.")
    assert encoded[0]["input_ids"] == expected["input_ids"] and encoded[0]["labels"] == 3.5
    sep = tokenizer.sep_token_id
    assert encoded[0]["input_ids"].count(sep) == 2
    types = encoded[0]["token_type_ids"]
    first_sep = encoded[0]["input_ids"].index(sep)
    assert set(types[: first_sep + 1]) == {0} and set(types[first_sep + 1:]) == {1}
    # longest_first truncation: the long second sentence is cut, the short first one kept whole
    assert len(encoded[1]["input_ids"]) == 32 and encoded[1]["input_ids"][:4] == tokenizer("Short.")["input_ids"][:4]


# --------------------------------------------------------------------------------------------- end to end
def compose_cfg(overrides):
    return compose_config(list(overrides))


TINY = ["model=tiny-random-bert", "dataset.max_train_samples=48", "dataset.max_eval_samples=40",
        "trainer.batch_size=8", "trainer.eval_batch_size=16", "trainer.log_every_steps=2", "trainer.base_lr=5e-3",
        "+trainer.callbacks.keep._target_=_glue_helpers.KeepEvalOutputs"]


def test_stsb_regression_end_to_end(tmp_path):
    cfg = compose_cfg(TINY + ["dataset=stsb", "trainer.epochs=2"])
    validate_config(cfg)
    metrics = train_run(cfg, tmp_path)
    kept = KeepEvalOutputs.last
    assert kept.config.num_labels == 1 and kept.config.problem_type == "regression"
    preds = np.array([row[0] for row in kept.logits])
    labels = np.array(kept.labels, dtype=np.float64)
    assert len(labels) == 40 and not np.all(labels == np.round(labels))  # real float scores
    assert metrics["eval_loss"] == pytest.approx(float(np.mean((preds - labels) ** 2)), rel=1e-5)
    assert metrics["eval_pearson"] == pytest.approx(float(np.corrcoef(preds, labels)[0, 1]), abs=1e-5)
    assert metrics["eval_score"] == metrics["eval_pearson"] and "eval_accuracy" not in metrics
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]  # MSE goes down on 48 examples x 2 epochs
    assert json.loads((tmp_path / "metrics.json").read_text())["eval_spearmanr"] == metrics["eval_spearmanr"]


@pytest.mark.parametrize(("task", "metric"), [("mrpc", "eval_f1"), ("cola", "eval_matthews_correlation")])
def test_classification_tasks_report_their_glue_metric(task, metric, tmp_path):
    metrics = train_run(compose_cfg(TINY + [f"dataset={task}"]), tmp_path)
    kept = KeepEvalOutputs.last
    preds = [int(np.argmax(row)) for row in kept.logits]
    expected = f1(preds, kept.labels) if task == "mrpc" else matthews_correlation(preds, kept.labels)
    assert metrics[metric] == pytest.approx(expected, abs=1e-9) and metrics["eval_score"] == metrics[metric]
    assert metrics["eval_accuracy"] == pytest.approx(np.mean(np.array(preds) == np.array(kept.labels)), abs=1e-9)


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def test_mnli_local_files_report_the_mismatched_set_too(tmp_path):
    """MNLI read from <data_root>/glue/mnli/ (GLUE's train / dev_matched / dev_mismatched layout): the matched
    set is the evaluation set, the mismatched one is reported as eval_mismatched_*."""
    header = ["index", "genre", "sentence1", "sentence2", "gold_label"]
    labels = ["entailment", "neutral", "contradiction"]
    rows = [[str(i), "fiction", f"Premise number {i}.", f"Hypothesis {i % 5}.", labels[i % 3]] for i in range(24)]
    folder = tmp_path / "glue" / "mnli"
    write_tsv(folder / "train.tsv", header, rows)
    write_tsv(folder / "dev_matched.tsv", header, rows[:9])
    write_tsv(folder / "dev_mismatched.tsv", header, rows[9:15])
    raw = load_raw("mnli", str(tmp_path))
    assert raw.label_names == labels and len(raw.train) == 24 and list(raw.extra_evals) == ["mismatched"]
    assert raw.extra_evals["mismatched"][0] == (("Premise number 9.", "Hypothesis 4."), 0)
    write_tsv(folder / "dev_mismatched.tsv", header, rows[:9])  # the same rows: the same metrics either way
    cfg = compose_cfg(TINY[:-1] + ["dataset=mnli", f"data_root={tmp_path}"])
    metrics = train_run(cfg, tmp_path / "run")
    assert {"eval_accuracy", "eval_score", "eval_mismatched_accuracy", "eval_mismatched_loss"} <= set(metrics)
    assert metrics["eval_score"] == metrics["eval_accuracy"]
    assert metrics["eval_mismatched_accuracy"] == metrics["eval_accuracy"]
    assert metrics["eval_mismatched_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)


def test_qqp_and_qnli_local_files(tmp_path):
    write_tsv(tmp_path / "glue" / "qqp" / "train.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
              [["0", "1", "2", "How?", "Why?", "0"], ["1", "3", "4", "What is it?", "What's it?", "1"]])
    write_tsv(tmp_path / "glue" / "qqp" / "dev.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
              [["2", "5", "6", "Who?", "Whom?", "1"]])
    qqp = load_raw("qqp", str(tmp_path))
    assert qqp.train[1] == (("What is it?", "What's it?"), 1) and qqp.metric == "f1_accuracy"
    write_tsv(tmp_path / "glue" / "qnli" / "train.tsv", ["index", "question", "sentence", "label"],
              [["0", "Where?", "Here.", "entailment"], ["1", "When?", "Blue.", "not_entailment"]])
    write_tsv(tmp_path / "glue" / "qnli" / "dev.tsv", ["index", "question", "sentence", "label"],
              [["0", "Who?", "Him.", "entailment"]])
    qnli = load_raw("qnli", str(tmp_path))
    assert qnli.train == [(("Where?", "Here."), 0), (("When?", "Blue."), 1)] and qnli.eval == [(("Who?", "Him."), 0)]
