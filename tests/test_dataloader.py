"""Packed pretraining batches: layout, exact resume from the saved state, rank striding."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import make_shards
from nanochat.dataloader import PretrainLoader
from nanochat.tokenizer import Tokenizer

# each test takes about a second; a producer thread that deadlocks fails in a minute, not five
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"shard {s} document {d} " + "lorem ipsum dolor " * (d % 7) for s in range(3) for d in range(60)]
    return Tokenizer.train_from_iterator(texts, vocab_size=300)


@pytest.fixture
def data(tmp_path):
    make_shards(tmp_path / "data", num_shards=4, docs_per_shard=60, rows_per_group=8)
    return tmp_path / "data"


def _loader(tokenizer, data, **kw):
    kw.setdefault("docs_per_batch", 5)
    return PretrainLoader(tokenizer, 2, 16, "train", directory=data, **kw)


def test_rows_are_shifted_token_streams_starting_with_bos(tokenizer, data):
    loader = _loader(tokenizer, data)
    x, y = next(loader)
    assert x.shape == y.shape == (2, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x[0, 0].item() == tokenizer.get_bos_token_id()
    first_doc = tokenizer.encode("shard 0 document 0 ", prepend=tokenizer.get_bos_token_id())
    assert x[0, : len(first_doc)].tolist() == first_doc
    loader.close()


@pytest.mark.parametrize("stop_after", [1, 4, 9, 30])
def test_resume_from_state_sees_exactly_the_same_tokens(tokenizer, data, stop_after):
    straight = _loader(tokenizer, data)
    expected = [torch.cat(b) for b in itertools.islice(straight, stop_after + 25)]
    straight.close()
    first = _loader(tokenizer, data)
    seen = [torch.cat(b) for b in itertools.islice(first, stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    first.close()
    resumed = _loader(tokenizer, data, state=state)
    seen += [torch.cat(b) for b in itertools.islice(resumed, 25)]
    resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(seen, expected)) and len(seen) == len(expected)


def test_ranks_read_different_documents(tokenizer, data):
    loaders = [_loader(tokenizer, data, rank=r, world_size=2) for r in range(2)]
    a, b = (next(ld)[0] for ld in loaders)
    assert not torch.equal(a, b)
    for ld in loaders:
        ld.close()


def test_validation_split_ends(tokenizer, data):
    loader = PretrainLoader(tokenizer, 2, 16, "val", directory=data, loop=False)
    batches = list(loader)
    assert 0 < len(batches) < 100
    loader.close()


def test_missing_data_is_reported_to_the_consumer(tokenizer, tmp_path):
    loader = PretrainLoader(tokenizer, 2, 16, "train", directory=tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="at least 2"):
        next(loader)
