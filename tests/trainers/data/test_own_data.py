"""dataset=files (CSV / TSV / JSON Lines) and dataset=hub (here a local dataset folder): rows, labels, one-line
errors for bad files, and tiny end-to-end runs (classification with sentence pairs, regression)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _config import compose_config
from _trainer_helpers import run_main, stderr_lines
from omegaconf import OmegaConf

from trainers.cli.schemas import validate_config
from trainers.core.errors import UserError
from trainers.data.files import read_files, read_hub, read_records
from trainers.experiments.single import train_run

CONF = Path(__file__).resolve().parents[3] / "conf"
TINY = ["model=tiny-random-bert", "trainer.batch_size=4", "trainer.eval_batch_size=8", "trainer.log_every_steps=1"]

PAIRS = [("A man plays a guitar.", "Someone plays music.", "yes"), ("A cat sleeps.", "A dog barks.", "no"),
         ("Kids play football.", "Children play a game.", "yes"), ("It rains.", "The sun is out.", "no"),
         ("She reads a book.", "A woman is reading.", "yes"), ("He cooks.", "He is asleep.", "no"),
         ("Birds fly south.", "Birds migrate.", "yes"), ("The bus is late.", "The bus left early.", "no")]


def write_csv(path: Path, rows, header=("premise", "hypothesis", "answer"), sep=","):
    lines = [sep.join(header)] + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def files_cfg(**keys):
    cfg = compose_config(["dataset=files", *TINY])
    for key, value in keys.items():
        OmegaConf.update(cfg, f"dataset.{key}", value)
    return cfg


pytestmark = pytest.mark.usefixtures("one_thread")  # small runs on one thread (conftest.py)


def test_csv_pairs_with_string_labels(tmp_path):
    train = write_csv(tmp_path / "train.csv", PAIRS)
    dev = write_csv(tmp_path / "dev.csv", PAIRS[:3])
    cfg = files_cfg(train_file=str(train), eval_file=str(dev), text_column="premise", text_pair_column="hypothesis",
                    label_column="answer")
    validate_config(cfg)
    raw = read_files(cfg.dataset)
    assert raw.label_names == ["no", "yes"] and not raw.regression and raw.metric == "accuracy"
    assert raw.train[0] == (("A man plays a guitar.", "Someone plays music."), 1)
    assert [y for _, y in raw.eval] == [1, 0, 1]
    metrics = train_run(cfg, tmp_path / "run")
    assert metrics["global_step"] == 2 and 0 <= metrics["eval_accuracy"] <= 1
    assert metrics["eval_score"] == metrics["eval_accuracy"]


def test_tsv_regression_and_jsonl_integer_labels(tmp_path):
    rows = [(a, b, str(float(i) / 2)) for i, (a, b, _) in enumerate(PAIRS)]
    train = write_csv(tmp_path / "train.tsv", rows, header=("s1", "s2", "score"), sep="\t")
    cfg = files_cfg(train_file=str(train), eval_file=str(train), text_column="s1", text_pair_column="s2",
                    label_column="score", problem_type="regression")
    raw = read_files(cfg.dataset)
    assert raw.regression and raw.metric == "pearson" and raw.train[3][1] == 1.5
    metrics = train_run(cfg, tmp_path / "run")
    assert "eval_pearson" in metrics and "eval_accuracy" not in metrics

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": a, "label": i % 3}) + "\n" for i, (a, _, _) in enumerate(PAIRS)))
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"text": "x", "label": "2"}) + "\n")  # "2" and 2 are the same class
    raw = read_files(files_cfg(train_file=str(jsonl), eval_file=str(dev)).dataset)
    assert raw.label_names == ["0", "1", "2"] and raw.eval == [("x", 2)]


def test_bad_files_are_one_line_errors(tmp_path):
    train = write_csv(tmp_path / "train.csv", PAIRS)
    cases = []
    empty = tmp_path / "empty.csv"
    empty.write_text("premise,hypothesis,answer\n")
    cases.append(({"eval_file": str(empty)}, "is empty (no rows)"))
    cases.append(({"label_column": "gold"}, "has no column 'gold' (columns: premise, hypothesis, answer)"))
    unseen = write_csv(tmp_path / "unseen.csv", [("a", "b", "maybe")])
    cases.append(({"eval_file": str(unseen)}, "label(s) 'maybe' do not occur in"))
    cases.append(({"problem_type": "regression"}, "label 'yes' is not a number"))
    cases.append(({"eval_file": str(tmp_path / "nope.csv")}, "does not exist"))
    cases.append(({"eval_file": str(tmp_path / "dev.parquet")}, "unknown file type '.parquet'"))
    for keys, message in cases:
        settings = {"train_file": str(train), "eval_file": str(train), "text_column": "premise",
                    "label_column": "answer", **keys}
        with pytest.raises(UserError) as err:
            read_files(files_cfg(**settings).dataset)
        assert message in str(err.value) and "\n" not in str(err.value), (keys, str(err.value))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        read_records(bad_json)


def test_config_checks(tmp_path):
    with pytest.raises(UserError, match="dataset=files needs dataset.train_file"):
        validate_config(files_cfg())
    with pytest.raises(UserError, match="dataset.problem_type must be classification or regression"):
        validate_config(files_cfg(train_file="a.csv", eval_file="b.csv", problem_type="ranking"))
    proc = run_main(["dataset=files", *TINY, "dataset.train_file=missing.csv", "dataset.eval_file=missing.csv",
                     f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 1
    assert stderr_lines(proc)[-1] == "error: data file missing.csv does not exist"


def test_hub_reader_on_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_csv(folder / "train.csv", PAIRS)
    write_csv(folder / "validation.csv", PAIRS[:2])
    cfg = compose_config(["dataset=hub", *TINY, f"dataset.path={folder}",
                         "dataset.text_column=premise", "dataset.text_pair_column=hypothesis",
                         "dataset.label_column=answer"])
    validate_config(cfg)
    raw = read_hub(cfg.dataset)
    assert raw.label_names == ["no", "yes"] and len(raw.train) == 8 and raw.eval[1] == (("A cat sleeps.",
                                                                                         "A dog barks."), 0)
    OmegaConf.update(cfg, "dataset.eval_split", "test")
    with pytest.raises(UserError, match=r"has no split 'test' \(splits: train, validation\)"):
        read_hub(cfg.dataset)
    OmegaConf.update(cfg, "dataset.path", str(tmp_path / "no-such-dataset"))
    with pytest.raises(UserError, match="cannot load dataset.path="):
        read_hub(cfg.dataset)


def test_hub_class_labels_keep_their_names_and_order(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["zebra", "apple", "mango"])})
    folder = tmp_path / "ds"
    folder.mkdir()
    Dataset.from_dict({"sentence": ["a", "b", "c", "d"], "label": [0, 1, 2, 1]}, features=features).to_parquet(
        str(folder / "train.parquet"))
    Dataset.from_dict({"sentence": ["e"], "label": [2]}, features=features).to_parquet(
        str(folder / "validation.parquet"))
    cfg = compose_config(["dataset=hub", *TINY, f"dataset.path={folder}",
                         "dataset.text_column=sentence"])
    raw = read_hub(cfg.dataset)
    # the dataset's own order, not sorted names: zebra stays class 0
    assert raw.label_names == ["zebra", "apple", "mango"]
    assert [y for _, y in raw.train] == [0, 1, 2, 1] and raw.eval == [("e", 2)]
