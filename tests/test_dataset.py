"""Document iteration: splits, distributed striding, exact resume, epochs; which shard folder is read."""

from __future__ import annotations

import itertools

import pytest

from conftest import make_shards, write_shard
from nanochat.dataset import DataPosition, iter_document_batches, iter_documents, split_shards
from nanochat.shards import CHOICE_FILE, DataChoiceError, choose_folder, data_dir


@pytest.fixture
def shards(tmp_path):
    # 4 shards of 50 docs in row groups of 8 (uneven: 7 groups, the last of 2 docs).
    contents = make_shards(tmp_path / "data", num_shards=4, docs_per_shard=50, rows_per_group=8)
    return tmp_path / "data", contents


def test_last_shard_is_validation(shards):
    directory, contents = shards
    assert list(split_shards("val", directory)) == [3]
    assert list(split_shards("train", directory)) == [0, 1, 2]
    assert list(iter_documents("val", directory)) == contents[3]
    assert list(iter_documents("train", directory)) == contents[0] + contents[1] + contents[2]


def test_single_shard_is_a_clear_error(tmp_path):
    write_shard(tmp_path / "d" / "shard_00000.parquet", ["a"])
    with pytest.raises(FileNotFoundError, match="at least 2"):
        split_shards("train", tmp_path / "d")


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_ranks_are_disjoint_and_complete(shards, world_size):
    directory, contents = shards
    per_rank = [list(iter_documents("train", directory, rank=r, world_size=world_size)) for r in range(world_size)]
    seen = [d for docs in per_rank for d in docs]
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(contents[0] + contents[1] + contents[2])
    if world_size > 1:
        assert all(per_rank)


def _take(it, n):
    return list(itertools.islice(it, n))


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1), (3, 0)])
@pytest.mark.parametrize("stop_after", [1, 3, 7, 8, 20])
def test_resume_continues_exactly(shards, world_size, rank, stop_after):
    directory, _ = shards
    kwargs = dict(directory=directory, rank=rank, world_size=world_size, batch_size=3, loop=True)
    uninterrupted = [docs for docs, _ in _take(iter_document_batches("train", **kwargs), stop_after + 40)]
    first = _take(iter_document_batches("train", **kwargs), stop_after)
    saved = DataPosition.from_dict(first[-1][1].to_dict())  # as a checkpoint would store it
    resumed = [docs for docs, _ in _take(iter_document_batches("train", start=saved, **kwargs), 40)]
    assert [d for d, _ in first] + resumed == uninterrupted


def test_loop_counts_epochs_and_repeats_data(shards):
    directory, contents = shards
    train = contents[0] + contents[1] + contents[2]
    batches = list(itertools.takewhile(lambda b: b[1].epoch < 2, iter_document_batches("train", directory=directory, loop=True)))
    docs = [d for b, _ in batches for d in b]
    assert docs == train + train
    assert batches[-1][1].epoch == 1


def test_shards_arriving_later_are_picked_up(tmp_path):
    directory = tmp_path / "data"
    write_shard(directory / "shard_00000.parquet", ["a0", "a1"])
    write_shard(directory / "shard_00009.parquet", ["val"])
    it = iter_documents("train", directory)
    assert next(it) == "a0"
    write_shard(directory / "shard_00001.parquet", ["b0"])  # lands while the reader is on shard 0
    assert list(it) == ["a1", "b0"]


def test_rank_without_any_row_group_fails_instead_of_spinning(tmp_path):
    directory = tmp_path / "data"
    write_shard(directory / "shard_00000.parquet", ["a", "b"], rows_per_group=8)
    write_shard(directory / "shard_00001.parquet", ["v"])
    with pytest.raises(RuntimeError, match="fewer row groups than there are ranks"):
        next(iter_document_batches("train", directory=directory, rank=1, world_size=2, loop=True))


def test_bad_split_and_rank(shards):
    directory, _ = shards
    with pytest.raises(ValueError):
        list(iter_documents("test", directory))
    with pytest.raises(ValueError):
        list(iter_documents("train", directory, rank=2, world_size=2))


def test_the_readers_use_the_chosen_folder_and_base_data_before_any_choice(base_dir):
    write_shard(base_dir / "base_data" / "shard_00000.parquet", ["fineweb train"])
    write_shard(base_dir / "base_data" / "shard_00001.parquet", ["fineweb val"])
    write_shard(base_dir / "base_data_climbmix" / "shard_00000.parquet", ["climbmix train"])
    write_shard(base_dir / "base_data_climbmix" / "shard_06542.parquet", ["climbmix val"])
    assert list(iter_documents("train")) == ["fineweb train"]  # what every earlier version read
    assert choose_folder("base_data_climbmix") == base_dir / "base_data_climbmix"
    assert list(iter_documents("train")) == ["climbmix train"] and list(iter_documents("val")) == ["climbmix val"]


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp", ".hidden", ""])
def test_a_choice_outside_the_base_dir_is_refused(base_dir, name):
    with pytest.raises(DataChoiceError, match="not a folder name"):
        choose_folder(name)
    base_dir.mkdir(parents=True)
    (base_dir / CHOICE_FILE).write_text(name + "\n")
    with pytest.raises(DataChoiceError, match=f"{CHOICE_FILE} should name a shard folder"):
        data_dir()
