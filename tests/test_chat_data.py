"""Midtraining (packed) and SFT (padded) batches of conversations: layout, masks, exact resume."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from nanochat.chat_data import PackedConversations, PaddedConversations
from nanochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"question {i} answer {i * 7} hello there friend" for i in range(300)]
    return Tokenizer.train_from_iterator(texts, vocab_size=300)


def conversations(n=23):
    return [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i * 7}" + " hello" * (i % 5)}]}
            for i in range(n)]


def test_packed_rows_are_the_rendered_stream(tokenizer):
    convs = conversations()
    stream = [t for c in convs for t in tokenizer.render_conversation(c)[0]]
    source = PackedConversations(tokenizer, convs, batch_size=2, seq_len=16)
    x, y = next(source)
    assert x.shape == y.shape == (2, 16)
    assert x[0].tolist() == stream[:16] and y[0].tolist() == stream[1:17] and x[1].tolist() == stream[17:33]


def test_padded_rows_learn_only_the_assistant(tokenizer):
    convs = conversations(4)
    source = PaddedConversations(tokenizer, convs, batch_size=4, seq_len=64)
    x, y = next(source)
    for row, conv in enumerate(convs):
        ids, mask = tokenizer.render_conversation(conv)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert y[row, :n].tolist() == expected and (y[row, n:] == -1).all()
    assert tokenizer.decode([t for t in y[0].tolist() if t >= 0]).startswith("answer 0")


@pytest.mark.parametrize("cls", [PackedConversations, PaddedConversations])
@pytest.mark.parametrize("stop_after", [1, 5, 13])
def test_resume_sees_the_same_batches_across_epochs(tokenizer, cls, stop_after):
    convs = conversations()
    straight = [torch.cat(b) for b in itertools.islice(cls(tokenizer, convs, 3, 16, rank=1, world_size=2), stop_after + 10)]
    first = cls(tokenizer, convs, 3, 16, rank=1, world_size=2)
    seen = [torch.cat(b) for b in itertools.islice(first, stop_after)]
    state = json.loads(json.dumps(first.state_dict()))
    seen += [torch.cat(b) for b in itertools.islice(cls(tokenizer, convs, 3, 16, rank=1, world_size=2, state=state), 10)]
    assert all(torch.equal(a, b) for a, b in zip(seen, straight))


def test_ranks_take_alternate_examples_and_epochs_count(tokenizer):
    convs = conversations(6)
    source = PaddedConversations(tokenizer, convs, batch_size=1, seq_len=64, rank=1, world_size=2)
    firsts = [tokenizer.decode(next(source)[0][0].tolist()) for _ in range(4)]
    assert "question 1" in firsts[0] and "question 3" in firsts[1] and "question 5" in firsts[2] and "question 1" in firsts[3]
    assert source.epoch == 1


def test_all_ignored_batch_gives_zero_loss_not_nan(tokenizer):
    from nanochat.gpt import GPTConfig, build_model

    model = build_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), "cpu")
    loss = model(torch.zeros(1, 8, dtype=torch.long), torch.full((1, 8), -1))
    assert loss.item() == 0.0


def test_too_small_a_mixture_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="too few"):
        PackedConversations(tokenizer, conversations(1), 1, 8, rank=1, world_size=2)


def test_padded_widths_are_bucketed_for_a_compiled_model(tokenizer):
    """Rows of 20 to 150 tokens: each batch is padded to 64, 128 or the 200 limit, never to its own length."""
    convs = [{"messages": [{"role": "user", "content": "question"}, {"role": "assistant", "content": "hello" + " there" * (i * 7)}]}
             for i in range(20)]
    source = PaddedConversations(tokenizer, convs, batch_size=2, seq_len=200)
    widths = [next(source)[0].size(1) for _ in range(10)]
    assert set(widths) <= {64, 128, 200} and len(set(widths)) >= 2
