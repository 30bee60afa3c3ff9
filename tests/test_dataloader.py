"""Pretraining batches: both packings' layout, exact resume from the saved state, rank striding, crop accounting."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from conftest import make_shards
from nanochat.dataloader import PACKINGS, DataStateError, PretrainLoader, _BestFit, main, packing_stats
from nanochat.tokenizer import Tokenizer

# each test takes about a second; a producer thread that deadlocks fails in a minute, not five
pytestmark = pytest.mark.timeout(60)

ROWS, SEQ_LEN = 2, 16


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"shard {s} document {d} " + "lorem ipsum dolor " * (d % 7) for s in range(3) for d in range(60)]
    return Tokenizer.train_from_iterator(texts, vocab_size=300)


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path / "data", num_shards=4, docs_per_shard=60, rows_per_group=8)


@pytest.fixture
def data(tmp_path, shards):
    return tmp_path / "data"


def _loader(tokenizer, data, **kw):
    kw.setdefault("docs_per_batch", 5)
    if kw.get("packing", "best-fit") == "best-fit":
        kw.setdefault("buffer_docs", 20)  # smaller than the split, so the buffer turns over within an epoch
    return PretrainLoader(tokenizer, ROWS, SEQ_LEN, "train", directory=data, **kw)


def _rows(batch) -> list[list[int]]:
    x, y = batch
    return torch.cat([x[:, :1], y], dim=1).tolist()


def _documents(tokenizer, shards) -> dict[tuple[int, ...], str]:
    """Every fixture document's tokens, as the loader makes them, -> its text."""
    bos = tokenizer.get_bos_token_id()
    return {tuple(tokenizer.encode(text, prepend=bos)): text for shard in shards for text in shard}


def _pieces(row: list[int], bos: int) -> list[tuple[int, ...]]:
    starts = [i for i, t in enumerate(row) if t == bos]
    return [tuple(row[a:b]) for a, b in zip(starts, starts[1:] + [len(row)])]


def _whole_or_cropped(piece: tuple[int, ...], documents: dict) -> tuple[str | None, bool]:
    """The document a row piece comes from (None when a short crop could be several's), and whether it
    was cropped; fails if the piece is no document's start."""
    if piece in documents:
        return documents[piece], False
    owners = [text for doc, text in documents.items() if doc[: len(piece)] == piece]
    assert owners, f"row piece {piece} is the start of no document"
    return (owners[0] if len(owners) == 1 else None), True


def _texts_in(batches, tokenizer, documents) -> list[str]:
    bos = tokenizer.get_bos_token_id()
    texts = (_whole_or_cropped(p, documents)[0] for b in batches for row in _rows(b) for p in _pieces(row, bos))
    return [t for t in texts if t is not None]


def test_concat_rows_are_shifted_token_streams_starting_with_bos(tokenizer, data):
    loader = _loader(tokenizer, data, packing="concat")
    x, y = next(loader)
    assert x.shape == y.shape == (ROWS, SEQ_LEN) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x[0, 0].item() == tokenizer.get_bos_token_id()
    first_doc = tokenizer.encode("shard 0 document 0 ", prepend=tokenizer.get_bos_token_id())
    assert x[0, : len(first_doc)].tolist() == first_doc
    loader.close()


def test_best_fit_rows_are_whole_documents_then_one_crop(tokenizer, data, shards):
    """Every row starts at <|bos|> and is made of document starts only: whole documents, the last maybe
    cropped; no padding or foreign token anywhere, and each document used once within the epoch."""
    documents, bos = _documents(tokenizer, shards), tokenizer.get_bos_token_id()
    loader = _loader(tokenizer, data)
    batches = list(itertools.islice(loader, 30))
    loader.close()
    used, cropped_long = [], 0
    for row in (r for b in batches for r in _rows(b)):
        assert len(row) == SEQ_LEN + 1 and row[0] == bos
        pieces = _pieces(row, bos)
        for i, piece in enumerate(pieces):
            text, cropped = _whole_or_cropped(piece, documents)
            assert not cropped or i == len(pieces) - 1, "only a row's last document may be cropped"
            cropped_long += cropped and len(pieces) == 1
            used += [text] if text is not None else []
    assert len(used) == len(set(used))
    longer = [d for d in documents if len(d) > SEQ_LEN + 1]
    assert longer and cropped_long > 0, "documents longer than a row are cropped to a row of their own"


def test_best_fit_takes_the_longest_document_that_fits(tokenizer, shards):
    """With every document pending from the start, each row's whole documents come longest first, and the
    first row opens with the longest document no longer than a row."""
    bos, row_len = tokenizer.get_bos_token_id(), SEQ_LEN + 1
    docs = [tokenizer.encode(t, prepend=bos) for shard in shards for t in shard]
    packer = _BestFit(row_len, len(docs), docs)
    rows = [packer.take(1, lambda: False) for _ in range(40)]
    pieces = [_pieces(row[0].tolist(), bos) for row in rows]
    assert len(pieces[0][0]) == max(len(d) for d in docs if len(d) <= row_len)
    for row in pieces:
        whole = [len(p) for p in row[:-1]]
        assert whole == sorted(whole, reverse=True)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("stop_after", [1, 4, 9, 30, 70])  # 70: past the end of the first epoch
def test_resume_from_state_sees_exactly_the_same_tokens(tokenizer, data, packing, stop_after):
    straight = _loader(tokenizer, data, packing=packing)
    expected = [torch.cat(b) for b in itertools.islice(straight, stop_after + 25)]
    straight.close()
    first = _loader(tokenizer, data, packing=packing)
    seen = [torch.cat(b) for b in itertools.islice(first, stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    first.close()
    assert packing == "concat" or state["pending"], "best-fit resumes with documents pending in its buffer"
    resumed = _loader(tokenizer, data, packing=packing, state=state)
    seen += [torch.cat(b) for b in itertools.islice(resumed, 25)]
    resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(seen, expected)) and len(seen) == len(expected)


def test_a_state_of_the_other_packing_is_refused(tokenizer, data):
    concat = _loader(tokenizer, data, packing="concat")
    next(concat)
    state = concat.state_dict()
    concat.close()
    with pytest.raises(DataStateError, match="packed 'concat'"):
        _loader(tokenizer, data, state=state)
    with pytest.raises(ValueError, match="best-fit, concat"):
        _loader(tokenizer, data, packing="greedy")


@pytest.mark.parametrize("packing", PACKINGS)
def test_ranks_read_different_documents(tokenizer, data, shards, packing):
    documents = _documents(tokenizer, shards)
    loaders = [_loader(tokenizer, data, rank=r, world_size=2, packing=packing) for r in range(2)]
    batches = [list(itertools.islice(ld, 10)) for ld in loaders]
    for ld in loaders:
        ld.close()
    if packing == "concat":  # rows start mid-document; the first rows differ
        assert not torch.equal(batches[0][0][0], batches[1][0][0])
        return
    ours, theirs = (set(_texts_in(b, tokenizer, documents)) for b in batches)
    assert ours and theirs and not ours & theirs


def test_validation_split_ends_with_every_row_it_holds(tokenizer, data, shards):
    """loop=False (corpus_bpb's evaluation) packs the split once and stops; the rows are what packing the
    split's documents directly gives, the last batch short when they do not fill it (a small split
    still evaluates)."""
    bos = tokenizer.get_bos_token_id()
    direct = _BestFit(SEQ_LEN + 1, 1000, [tokenizer.encode(t, prepend=bos) for t in shards[-1]])
    rows = []
    while (row := direct.take(1, lambda: False)) is not None:
        rows.append(row[0].tolist())
    batch = next(b for b in range(2, len(rows)) if len(rows) % b)  # leaves a short last batch
    loader = PretrainLoader(tokenizer, batch, SEQ_LEN, "val", directory=data, loop=False)
    batches = list(loader)
    with pytest.raises(StopIteration):
        next(loader)
    loader.close()
    assert len(batches) == -(-len(rows) // batch) > 1
    assert [r for b in batches for r in _rows(b)] == rows
    assert all(len(b[0]) == batch for b in batches[:-1]) and len(batches[-1][0]) == len(rows) % batch


def test_missing_data_is_reported_to_the_consumer(tokenizer, tmp_path):
    loader = PretrainLoader(tokenizer, 2, 16, "train", directory=tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="at least 2"):
        next(loader)


def _greedy_crop(lengths: list[int], row_len: int) -> int:
    """Tokens cropped by BOS-aligned packing in arrival order: a document that does not fit is cropped."""
    cropped, filled = 0, 0
    for n in lengths:
        space = row_len - filled
        cropped += max(0, n - space)
        filled = (filled + min(n, space)) % row_len
    return cropped


def test_best_fit_crops_less_than_packing_in_order(tokenizer):
    """On documents of varied lengths, choosing from a buffer crops fewer tokens than taking documents in
    arrival order, and never fewer than the overhang of documents longer than a row."""
    rng = random.Random(0)
    texts = [f"doc {i} " + "lorem ipsum dolor " * rng.randint(0, 40) for i in range(400)]
    bos = tokenizer.get_bos_token_id()
    documents = [np.asarray(tokenizer.encode(t, prepend=bos)) for t in texts]
    row_len = 64
    stats = packing_stats(documents, row_len - 1, buffer_docs=100)
    in_order = _greedy_crop([len(d) for d in documents], row_len)
    overhang = sum(max(0, len(d) - row_len) for d in documents)
    print(f"\ncropped: best-fit {stats.best_fit_cropped_tokens / stats.tokens:.1%}, "
          f"in order {in_order / stats.tokens:.1%}, unavoidable {overhang / stats.tokens:.1%} of {stats.tokens:,} tokens")
    assert overhang <= stats.best_fit_cropped_tokens < in_order
    assert stats.tokens == sum(len(d) for d in documents) and stats.documents == len(documents)
    kept = stats.tokens - stats.best_fit_cropped_tokens
    assert 0 <= kept - stats.best_fit_rows * row_len < row_len, "every kept token is in a full row but the last"


def test_cli_prints_both_packings_costs(tokenizer, data, tmp_path, capsys):
    tokenizer.save(tmp_path / "tok")
    assert main([str(data), "--seq-len", "16", "32", "--tokenizer", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert out.count("best-fit:") == out.count("concat:") == 2 and "seq len 32" in out
    assert main([str(tmp_path / "nothing"), "--tokenizer", str(tmp_path / "tok")]) == 1
    assert main([str(data), "--tokenizer", str(tmp_path / "no-tokenizer")]) == 2
