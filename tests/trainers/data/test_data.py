"""Offline datasets, subsets, and the deterministic, resumable, sharded sampler."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainers.core.errors import UserError
from trainers.data.readers import load_raw, subset
from trainers.data.sampling import EpochSampler, ShardSampler

DATA_ROOT = os.environ["DATA_ROOT"]


@pytest.mark.parametrize(("name", "train", "evals", "labels"), [
    ("sst2", 67349, 872, 2),
    ("banking77", 10003, 3080, 77),
    ("clinc150", 15000, 3000, 150),
])
def test_local_datasets(name, train, evals, labels):
    raw = load_raw(name, DATA_ROOT)
    assert (len(raw.train), len(raw.eval), len(raw.label_names)) == (train, evals, labels)
    assert {y for _, y in raw.train} == set(range(labels))
    assert all(isinstance(t, str) and t for t, _ in raw.train[:100])


def test_sst2_reads_numbers_as_text_and_labels_as_ints():
    raw = load_raw("sst2", DATA_ROOT)
    assert sum(y for _, y in raw.eval) == 444  # README: 444 positive dev sentences
    assert all(isinstance(t, str) for t, _ in raw.train)


def test_clinc150_labels_follow_domains():
    import json

    domains = json.loads((Path(DATA_ROOT) / "clinc150" / "domains.json").read_text())
    raw = load_raw("clinc150", DATA_ROOT)
    first_domain = next(iter(domains.values()))
    assert raw.label_names[:15] == first_domain


def test_subset_is_fixed_and_ordered():
    rows = [(str(i), i % 2) for i in range(100)]
    a, b = subset(rows, 10), subset(rows, 10)
    assert a == b and len(a) == 10 and a == sorted(a, key=lambda r: int(r[0]))
    assert subset(rows, None) is rows and subset(rows, 1000) is rows


def test_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"missing data folder .*sst2"):
        load_raw("sst2", str(tmp_path))
    (tmp_path / "banking77").mkdir()
    (tmp_path / "banking77" / "train.csv").write_text("text,category\n")
    with pytest.raises(UserError, match=r"missing data file\(s\) for dataset banking77: .*test.csv"):
        load_raw("banking77", str(tmp_path))


def test_no_data_root_and_no_hub_says_what_to_set():
    with pytest.raises(UserError) as info:
        load_raw("sst2", None)  # HF_DATASETS_OFFLINE=1 in the tests
    assert "set data_root=" in str(info.value) and "DATA_ROOT" in str(info.value)


def test_sampler_is_a_seeded_permutation_per_epoch():
    s = EpochSampler(20, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    assert sorted(e0) == list(range(20))
    assert list(s) == e0  # deterministic
    s.set_epoch(1)
    assert list(s) != e0
    assert list(EpochSampler(20, seed=4)) != e0


def test_sampler_resumes_mid_epoch():
    s = EpochSampler(20, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=8)
    assert list(s) == full[8:] and len(s) == 12


def test_sampler_shards_cover_the_data_with_equal_sizes():
    shards = []
    for rank in range(3):
        s = EpochSampler(10, seed=0, rank=rank, world_size=3)
        s.set_epoch(5)
        shards.append(list(s))
    assert [len(x) for x in shards] == [4, 4, 4]
    assert set().union(*map(set, shards)) == set(range(10))


def test_group_by_length_makes_batches_of_similar_length():
    lengths = [(i * 37) % 50 + 1 for i in range(400)]
    s = EpochSampler(400, seed=1, lengths=lengths, batch_size=8)
    s.set_epoch(0)
    order = list(s)
    assert sorted(order) == list(range(400))
    batches = [order[i:i + 8] for i in range(0, 400, 8)]
    spread = sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches) / len(batches)
    assert spread < 5  # random batches of these lengths spread ~40
    s.set_epoch(1)
    assert list(s) != order


def test_group_by_length_shards_line_up_across_processes():
    lengths = [(i * 37) % 50 + 1 for i in range(64)]
    shards = []
    for rank in range(2):
        s = EpochSampler(64, seed=1, rank=rank, world_size=2, lengths=lengths, batch_size=4)
        s.set_epoch(0)
        shards.append(list(s))
    for k in range(0, 32, 4):  # the k-th batch of each process comes from the same length group
        both = shards[0][k:k + 4] + shards[1][k:k + 4]
        assert max(lengths[j] for j in both) - min(lengths[j] for j in both) < 10


def test_eval_shards_are_disjoint():
    parts = [list(ShardSampler(7, rank, 2)) for rank in range(2)]
    assert parts == [[0, 2, 4, 6], [1, 3, 5]]
