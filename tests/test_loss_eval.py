"""evaluate_bpb against the figure worked out by hand: the nats of the counted targets over their bytes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPTConfig, build_model
from nanochat.loss_eval import evaluate_bpb

VOCAB = 12
SPECIALS = (10, 11)  # 0 bytes each, as a tokenizer's special tokens have


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=16, vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), "cpu")
    with torch.no_grad():  # away from the init, whose zeroed projections make every position predict alike
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def token_bytes() -> torch.Tensor:
    lengths = torch.tensor([(i % 4) + 1 for i in range(VOCAB)], dtype=torch.int32)
    lengths[list(SPECIALS)] = 0
    return lengths


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows whose targets include specials and ignored positions (-1)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        x = torch.randint(0, VOCAB, (2, 8), generator=gen)
        y = torch.randint(0, VOCAB, (2, 8), generator=gen)
        y[0, :3] = -1
        y[1, 5] = SPECIALS[0]
        y[1, 6] = SPECIALS[1]
        out.append((x, y))
    return out


def by_hand(model, used: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    nats, nbytes, lengths = 0.0, 0, token_bytes().tolist()
    with torch.no_grad():
        for x, y in used:
            logprobs = F.log_softmax(model(x).double(), dim=-1)
            for row, col in zip(*torch.nonzero(y >= 0, as_tuple=True)):
                target = int(y[row, col])
                if lengths[target]:
                    nats -= float(logprobs[row, col, target])
                    nbytes += lengths[target]
    return nats / math.log(2) / nbytes


def test_bits_per_byte_is_the_counted_nats_over_their_bytes(model):
    data = batches(3)
    assert evaluate_bpb(model, data, steps=2, token_bytes=token_bytes()) == pytest.approx(by_hand(model, data[:2]), rel=1e-5)


def test_a_loader_that_runs_out_early_ends_the_evaluation(model):
    data = batches(2)
    assert evaluate_bpb(model, iter(data), steps=5, token_bytes=token_bytes()) == pytest.approx(by_hand(model, data), rel=1e-5)


def test_nothing_to_count_is_an_error_not_a_number(model):
    x, y = batches(1)[0]
    only_specials = torch.where(y >= 0, SPECIALS[0], -1)
    with pytest.raises(ValueError, match="no evaluation tokens"):
        evaluate_bpb(model, [(x, only_specials)], steps=1, token_bytes=token_bytes())
