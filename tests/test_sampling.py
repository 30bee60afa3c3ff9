"""Sampling (nanochat.sampling) on fixed logits, against a sampler written out longhand here: the
parameter checks, seeded generators, and each row's pick from its own uniform draw.

Fast by design (no model): the mutation run (tests/mutation.py) runs this file once per mutant."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from nanochat.sampling import MAX_TOP_LOGPROBS, SEED_RANGE, SamplingParams, make_generator, sample_tokens

CPU = torch.device("cpu")


# ---------------------------------------------------------------- parameters


def test_defaults_are_the_documented_ones():
    # the chat CLI, the server and RL build SamplingParams with some fields left out and rely on these
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens, p.seed, p.stop, p.logprobs) == (0.8, 50, 1.0, 512, None, (), None)


def test_params_are_immutable():
    # one SamplingParams is shared by the n samples of a request; none may change it for the others
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.0


@pytest.mark.parametrize("fields", [
    {"temperature": 0.0}, {"temperature": 2.0}, {"top_k": 0}, {"top_k": None}, {"top_p": 1.0}, {"top_p": 1e-9},
    {"max_tokens": 1}, {"seed": -SEED_RANGE}, {"seed": SEED_RANGE - 1}, {"seed": 0}, {"logprobs": 0},
    {"logprobs": MAX_TOP_LOGPROBS},
])
def test_the_edges_of_each_range_are_accepted(fields):
    p = SamplingParams(**fields)
    assert all(getattr(p, name) == value for name, value in fields.items())


@pytest.mark.parametrize("fields, message", [
    ({"temperature": -0.01}, "temperature must be in [0, 2], got -0.01"),
    ({"temperature": 2.01}, "temperature must be in [0, 2], got 2.01"),
    ({"top_k": -1}, "top_k must be >= 0, got -1"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.01}, "top_p must be in (0, 1], got 1.01"),
    ({"max_tokens": -1}, "max_tokens must be >= 0, got -1"),
    ({"seed": SEED_RANGE}, f"seed must be a 64-bit integer, got {SEED_RANGE}"),
    ({"seed": -SEED_RANGE - 1}, f"seed must be a 64-bit integer, got {-SEED_RANGE - 1}"),
    ({"logprobs": -1}, "logprobs must be in [0, 20], got -1"),
    ({"logprobs": MAX_TOP_LOGPROBS + 1}, "logprobs must be in [0, 20], got 21"),
    ({"prompt_logprobs": -1}, "prompt_logprobs must be in [0, 20], got -1"),
])
def test_values_out_of_range_are_refused_naming_the_field_and_range(fields, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**fields)
    assert str(err.value) == message


def test_the_limits_are_openais():
    # the API layer validates requests against these same names; OpenAI: signed 64-bit seeds, top_logprobs <= 20
    assert SEED_RANGE == 2**63 and MAX_TOP_LOGPROBS == 20


# ---------------------------------------------------------------- generators


def draws(gen: torch.Generator, n: int = 4) -> list[float]:
    return torch.rand(n, generator=gen).tolist()


def test_a_seeded_sample_repeats_and_sample_i_uses_seed_plus_i():
    assert draws(make_generator(7, 0, CPU)) == draws(make_generator(7, 0, CPU))
    assert draws(make_generator(7, 3, CPU)) == draws(make_generator(10, 0, CPU))
    assert draws(make_generator(7, 0, CPU)) != draws(make_generator(7, 1, CPU))
    reference = torch.Generator().manual_seed(7 + 3)
    assert draws(make_generator(7, 3, CPU)) == draws(reference)


def test_negative_and_largest_seeds_wrap_modulo_two_to_the_64():
    # an OpenAI seed is signed; torch takes [0, 2^64), so -1 is the generator seeded 2^64 - 1
    assert draws(make_generator(-1, 0, CPU)) == draws(torch.Generator().manual_seed(2**64 - 1))
    assert draws(make_generator(-SEED_RANGE, 1, CPU)) == draws(torch.Generator().manual_seed(2**63 + 1))
    assert draws(make_generator(SEED_RANGE - 1, 2, CPU)) == draws(torch.Generator().manual_seed(2**63 + 1))


def test_unseeded_generators_differ():
    # without a seed two requests must not sample the same answer (a fixed default seed would)
    assert draws(make_generator(None, 0, CPU), 8) != draws(make_generator(None, 0, CPU), 8)
    assert draws(make_generator(None, 0, CPU), 8) != draws(torch.Generator(), 8)


def test_the_generator_is_on_the_device_asked_for():
    assert make_generator(1, 0, CPU).device == CPU


# ---------------------------------------------------------------- picking tokens


def longhand(logits: list[float], p: SamplingParams, u: float) -> int:
    """What sample_tokens documents, one row in plain Python: greedy at temperature 0; otherwise the
    top-k of logits/T, softmax, the shortest prefix whose mass reaches top_p (the first stays), then
    the first token whose cumulative mass reaches u times the kept mass."""
    if p.temperature == 0:
        return max(range(len(logits)), key=lambda i: logits[i])
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[: min(p.top_k or len(logits), len(logits))]
    scaled = [logits[i] / p.temperature for i in order]
    weights = [math.exp(s - scaled[0]) for s in scaled]
    probs = [w / sum(weights) for w in weights]
    kept, before = [], 0.0
    for prob in probs:
        if before >= p.top_p:
            break
        kept.append(prob)
        before += prob
    target, total = u * sum(kept), 0.0
    for rank, prob in enumerate(kept):
        total += prob
        if total >= target:
            return order[rank]
    return order[len(kept) - 1]


# distinct logits (no ties, so the order of equal values cannot matter), spread so that every
# parameter set below keeps a different number of tokens
LOGITS = [0.3, 2.0, -1.0, 1.1, 0.0, 2.6, -0.4, 1.7]
PARAMS = [
    SamplingParams(temperature=1.0, top_k=None),
    SamplingParams(temperature=0.5, top_k=0),
    SamplingParams(temperature=1.9, top_k=3),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.2, top_k=None, top_p=0.7),
    SamplingParams(temperature=1.0, top_k=5, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=0.8, top_k=100),  # more than the vocabulary: no limit
]


@pytest.mark.parametrize("seed", range(40))
def test_each_row_picks_what_its_parameters_and_own_draw_say(seed):
    logits = torch.tensor([LOGITS] * len(PARAMS))
    gens = [make_generator(seed, i, CPU) for i in range(len(PARAMS))]
    # each hot row draws exactly one uniform number from its own generator: replay them on copies
    us = [torch.rand(1, generator=make_generator(seed, i, CPU)).item() for i in range(len(PARAMS))]
    picks = sample_tokens(logits, PARAMS, gens)
    assert picks == [longhand(LOGITS, p, u) for p, u in zip(PARAMS, us)]


def test_over_many_draws_each_row_reaches_exactly_the_tokens_it_may_pick():
    # the allowed set, not just one pick: a top-k off by one or a top-p cut one token late shows here
    allowed = {0: {5, 1, 7}, 1: {5}, 2: {5, 1, 7, 3, 0}}
    params = [SamplingParams(temperature=2.0, top_k=3), SamplingParams(temperature=2.0, top_k=1),
              SamplingParams(temperature=2.0, top_k=5)]
    seen = {row: set() for row in allowed}
    logits = torch.tensor([LOGITS] * len(params))
    for seed in range(150):
        for row, token in enumerate(sample_tokens(logits, params, [make_generator(seed, i, CPU) for i in range(3)])):
            seen[row].add(token)
    assert seen == allowed


@pytest.mark.parametrize("top_p, kept", [(0.25, 1), (0.26, 2), (0.5, 2), (0.51, 3), (0.75, 3), (0.76, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_prefix_that_reaches_p(top_p, kept):
    # four equal logits: every probability is exactly 1/4, so the cumulative mass before the i-th token
    # is exactly (i - 1)/4 and a cut at p = 0.5 keeps two tokens, never three
    params = [SamplingParams(temperature=1.0, top_k=None, top_p=top_p)]
    seen = {sample_tokens(torch.zeros(1, 4), params, [make_generator(seed, 0, CPU)])[0] for seed in range(120)}
    assert len(seen) == kept


def test_temperature_zero_is_argmax_and_leaves_the_generator_alone():
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.9], [5.0, -1.0, 4.0, 0.0]])
    greedy = SamplingParams(temperature=0.0)
    gens = [make_generator(3, 0, CPU), make_generator(3, 1, CPU)]
    before = [g.get_state() for g in gens]
    assert sample_tokens(logits, [greedy, greedy], gens) == [1, 0]
    # a greedy row draws nothing, so a seeded hot row beside it samples the same as alone
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, before))


def test_a_seeded_row_samples_the_same_whatever_else_is_in_the_batch():
    hot = SamplingParams(temperature=1.5, top_k=4, seed=11)
    row = torch.tensor(LOGITS)
    alone = sample_tokens(row[None], [hot], [make_generator(11, 0, CPU)])[0]
    for others in ([SamplingParams(temperature=0.0)], [SamplingParams(temperature=1.0, top_k=None)],
                   [SamplingParams(temperature=0.7, top_k=2, top_p=0.5), SamplingParams(temperature=2.0, top_k=8)]):
        logits = torch.stack([row] + [torch.randn(len(LOGITS)) for _ in others])
        gens = [make_generator(11, 0, CPU)] + [make_generator(None, 0, CPU) for _ in others]
        assert sample_tokens(logits, [hot, *others], gens)[0] == alone


def test_half_precision_logits_sample_as_their_float_values():
    logits = torch.tensor([LOGITS] * len(PARAMS), dtype=torch.bfloat16)
    values = logits[0].float().tolist()
    us = [torch.rand(1, generator=make_generator(5, i, CPU)).item() for i in range(len(PARAMS))]
    picks = sample_tokens(logits, PARAMS, [make_generator(5, i, CPU) for i in range(len(PARAMS))])
    assert picks == [longhand(values, p, u) for p, u in zip(PARAMS, us)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_every_row_still_picks_what_its_own_draw_says():
    # every tensor sample_tokens makes must sit on the logits' device; a CPU-only run cannot tell
    gpu = torch.device("cuda")
    logits = torch.tensor([LOGITS] * len(PARAMS), device=gpu)
    for seed in range(10):
        us = [torch.rand(1, generator=make_generator(seed, i, gpu), device=gpu).item() for i in range(len(PARAMS))]
        picks = sample_tokens(logits, PARAMS, [make_generator(seed, i, gpu) for i in range(len(PARAMS))])
        assert picks == [longhand(LOGITS, p, u) for p, u in zip(PARAMS, us)]
    assert make_generator(1, 0, gpu).device.type == "cuda"
