"""Every data error names the file, the line or record, and what was expected; labels are checked against the
label set when the data is read, not at training time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _trainer_helpers import TINY, assert_one_line_error, run_main

from trainers.core.errors import UserError
from trainers.data.readers import load_raw

SST2_HEADER = "sentence\tlabel\n"


def sst2(root: Path, train: str, dev: str = SST2_HEADER + "fine\t1\n") -> Path:
    folder = root / "sst2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text(train, encoding="utf-8")
    (folder / "dev.tsv").write_text(dev, encoding="utf-8")
    return folder


def error(name: str, root: Path) -> str:
    with pytest.raises(UserError) as info:
        load_raw(name, str(root))
    return str(info.value)


def test_sst2_good_file_reads(tmp_path):
    sst2(tmp_path, SST2_HEADER + "a good film\t1\nbad\t0\n")
    raw = load_raw("sst2", str(tmp_path))
    assert raw.train == [("a good film", 1), ("bad", 0)] and raw.eval == [("fine", 1)]


@pytest.mark.parametrize(("train", "message"), [
    (SST2_HEADER + "ok\t1\nnice\tpositive\n", "train.tsv, line 3: unknown label 'positive' (expected one of 0, 1)"),
    (SST2_HEADER + "ok\t5\n", "train.tsv, line 2: unknown label '5' (expected one of 0, 1)"),
    ("text\tlabel\nok\t1\n", "train.tsv: the header line ['text', 'label'] lacks sentence; expected tab-separated "
                             "columns sentence, label"),
    (SST2_HEADER + "ok\t1\nno label here\n", "train.tsv, line 3: fewer fields than the header; expected "
                                              "tab-separated columns sentence, label"),
])
def test_sst2_bad_rows(tmp_path, train, message):
    folder = sst2(tmp_path, train)
    assert error("sst2", tmp_path) == f"{folder / 'train.tsv'}{message[len('train.tsv'):]}"


def test_sst2_binary_garbage(tmp_path):
    folder = sst2(tmp_path, "")
    (folder / "train.tsv").write_bytes(b"sentence\tlabel\n\xff\xfe\x00garbage\x81\t1\n")
    assert error("sst2", tmp_path).startswith(f"{folder / 'train.tsv'}, line ")
    assert "not UTF-8 text" in error("sst2", tmp_path)


def test_banking77_unknown_category(tmp_path):
    folder = tmp_path / "banking77"
    folder.mkdir()
    (folder / "categories.json").write_text(json.dumps(["card_arrival", "card_linking"]))
    (folder / "train.csv").write_text("text,category\nwhere is my card,card_arrival\nhi,lost_card\n")
    (folder / "test.csv").write_text("text,category\nlink it,card_linking\n")
    assert error("banking77", tmp_path) == (f"{folder / 'train.csv'}, line 3: unknown category (not in "
                                            f"categories.json) 'lost_card' (expected one of card_arrival, "
                                            f"card_linking)")


def clinc(root: Path, data: str, domains: dict | None = None) -> Path:
    folder = root / "clinc150"
    folder.mkdir()
    (folder / "data_full.json").write_text(data)
    (folder / "domains.json").write_text(json.dumps(domains or {"banking": ["balance", "transfer"]}))
    return folder


def test_clinc_truncated_json(tmp_path):
    full = json.dumps({"train": [["what is my balance", "balance"]], "val": [["send money", "transfer"]]})
    folder = clinc(tmp_path, full[: len(full) // 2])
    message = error("clinc150", tmp_path)
    assert message.startswith(f"{folder / 'data_full.json'}: not valid JSON at line 1, column ")
    assert message.endswith('expected an object with "train" and "val" lists of [text, intent] pairs')


def test_clinc_unknown_intent_names_the_record(tmp_path):
    folder = clinc(tmp_path, json.dumps({"train": [["hi", "balance"], ["hey", "greeting"]], "val": []}))
    assert error("clinc150", tmp_path) == (f"{folder / 'data_full.json'}, train[1]: unknown intent (not in "
                                           f"domains.json) 'greeting' (expected one of balance, transfer)")


def test_a_bad_label_is_one_line_from_the_cli(tmp_path):
    sst2(tmp_path / "data", SST2_HEADER + "ok\t1\nnice\tpositive\n")
    proc = run_main(TINY + [f"data_root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(proc, f"{tmp_path / 'data' / 'sst2' / 'train.tsv'}, line 3: unknown label 'positive'")


def cifar(root: Path, protocol: int) -> Path:
    import pickle

    import numpy as np

    base = root / "cifar100" / "cifar-100-python"
    base.mkdir(parents=True)
    for split, n in (("train", 6), ("test", 4)):
        data = np.arange(n * 3072, dtype=np.int64).astype(np.uint8).reshape(n, 3072)
        (base / split).write_bytes(pickle.dumps({"data": data, "fine_labels": list(range(n))}, protocol=protocol))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}, protocol=protocol))
    return base


@pytest.mark.parametrize("protocol", [2, 4, 5])  # 2: as the official files; 4, 5: numpy 2's own reductions
def test_cifar100_pickles_with_numpy_arrays_load(tmp_path, protocol):
    import numpy as np

    from trainers.data.continual import _read_cifar100

    cifar(tmp_path, protocol)
    train, test, names = _read_cifar100(tmp_path / "cifar100")
    assert names[:2] == ["c0", "c1"] and len(train) == 6 and len(test) == 4
    image, label = train[1]
    expected = (np.arange(3072, 2 * 3072) % 256).astype(np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
    assert label == 1 and np.array_equal(image, expected)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["meta", "train"])
def test_cifar100_crafted_pickle_is_refused_without_running_it(tmp_path, name):
    import pickle

    from trainers.data.continual import _read_cifar100

    base = cifar(tmp_path, 2)
    marker = tmp_path / "ran"
    (base / name).write_bytes(pickle.dumps({"fine_label_names": _RunsCode(marker), "data": _RunsCode(marker)}))
    with pytest.raises(UserError) as info:
        _read_cifar100(tmp_path / "cifar100")
    assert str(info.value).startswith(f"{base / name}: not a CIFAR-100 python file (refusing to load ")
    assert "system" in str(info.value) and not marker.exists()


def test_cifar100_label_out_of_range(tmp_path):
    import pickle

    import numpy as np

    from trainers.data.continual import _read_cifar100

    base = cifar(tmp_path, 2)
    (base / "test").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [3, 100]}))
    with pytest.raises(UserError, match="fine_labels\\[1\\] = 100 is not a class index 0..99"):
        _read_cifar100(tmp_path / "cifar100")
