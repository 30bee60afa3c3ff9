"""nanochat.compiled_decode: the decode step that runs compiled computes what the eager model does.

The fast tests run the step's code eagerly (inductor takes tens of seconds per graph on
2 cores): its attention over the cache plus the new key, the row padding, the key span,
the cache writes and the Engine's use of it. The slow test compiles it for real.
"""

from __future__ import annotations

import pytest
import torch

from nanochat.flags import warm_up
from nanochat.compiled_decode import SPAN_STEP, CompiledDecoder, bucket_sizes
from nanochat.engine import Engine, collect
from nanochat.kv_slots import SlotKVCache
from nanochat.sampling import SamplingParams
from tests.test_engine import random_model, tokenizer  # noqa: F401  (the fixture)

GREEDY = SamplingParams(temperature=0.0, max_tokens=14)


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def model(request, tokenizer):  # noqa: F811
    return random_model(tokenizer.get_vocab_size(), n_kv_head=request.param)


def uncompiled_engine(model, tokenizer, max_batch: int) -> Engine:  # noqa: F811
    """An engine that decodes with the compiled path's step, run uncompiled: its code, without inductor's minutes."""
    engine = Engine(model, tokenizer, max_batch=max_batch)
    engine.decoder = CompiledDecoder(model, engine.cache, compile=False)
    return engine


def prefill(model, cache: SlotKVCache, prompts: list[list[int]]) -> None:
    with torch.no_grad():
        for slot, prompt in enumerate(prompts):
            if prompt:
                model(torch.tensor([prompt]), kv_cache=cache.prefill_view([slot]))


def test_one_step_matches_the_eager_decode_view(model):
    """Rows of different lengths, one of them idle: same logits, same cache afterwards."""
    prompts = [[1, 2, 3, 4, 5], [7, 8], [], [9, 10, 11, 12, 13, 14, 15, 16]]
    eager, compiled = (SlotKVCache(model.config, slots=4, max_len=96) for _ in range(2))
    for cache in (eager, compiled):
        prefill(model, cache, prompts)
    decoder = CompiledDecoder(model, compiled, compile=False)
    active = torch.tensor([True, True, False, True])
    with torch.no_grad():
        for step in range(3):
            inputs = torch.tensor([[20 + step + i] for i in range(4)])
            want = model(inputs, kv_cache=eager.decode_view(4, active))[:, -1]
            got = decoder(inputs, 4, active)
            torch.testing.assert_close(got[active], want[active], atol=1e-5, rtol=1e-5)
    assert compiled.lengths.tolist() == eager.lengths.tolist() == [8, 5, 0, 11]
    for slot, length in enumerate(eager.lengths.tolist()):
        torch.testing.assert_close(compiled.k[:, slot, :, :length], eager.k[:, slot, :, :length])
        torch.testing.assert_close(compiled.v[:, slot, :, :length], eager.v[:, slot, :, :length])


def test_rows_are_padded_to_a_power_of_two_and_the_padding_is_not_kept(model):
    cache = SlotKVCache(model.config, slots=8, max_len=96)
    prefill(model, cache, [[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    decoder = CompiledDecoder(model, cache, compile=False)
    assert decoder.buckets == [1, 2, 4, 8]
    before = cache.k[:, 3:].clone()
    with torch.no_grad():
        logits = decoder(torch.tensor([[10], [11], [12]]), 3, torch.tensor([True, True, True]))
    assert logits.shape == (3, model.config.vocab_size)
    assert cache.lengths.tolist() == [4, 3, 5, 0, 0, 0, 0, 0]
    assert torch.equal(cache.k[:, 3:], before)


def test_buckets_are_powers_of_two_ending_at_the_slot_count():
    for slots, buckets in ((1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (12, [1, 2, 4, 8, 12])):
        assert bucket_sizes(slots) == buckets


def test_keys_past_a_span_step_are_attended(model):
    """Past SPAN_STEP tokens the span grows a step: the long row still sees its first keys."""
    prompt = [(3 * i) % 50 + 1 for i in range(SPAN_STEP + 5)]
    eager, compiled = (SlotKVCache(model.config, slots=2, max_len=2 * SPAN_STEP + 8) for _ in range(2))
    for cache in (eager, compiled):
        prefill(model, cache, [prompt, prompt[:3]])
    decoder = CompiledDecoder(model, compiled, compile=False)
    active = torch.tensor([True, True])
    with torch.no_grad():
        want = model(torch.tensor([[5], [6]]), kv_cache=eager.decode_view(2, active))[:, -1]
        got = decoder(torch.tensor([[5], [6]]), 2, active)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_full_cache_is_refused_like_the_eager_path(model):
    cache = SlotKVCache(model.config, slots=1, max_len=6)
    prefill(model, cache, [[1, 2, 3, 4, 5, 6]])
    with pytest.raises(ValueError, match="reached the cache's 6 tokens"):
        CompiledDecoder(model, cache, compile=False)(torch.tensor([[1]]), 1, torch.tensor([True]))


def test_warm_up_keeps_what_the_cache_holds(model):
    cache = SlotKVCache(model.config, slots=4, max_len=96)
    prefill(model, cache, [[1, 2, 3], [4, 5]])
    k, v, lengths = cache.k.clone(), cache.v.clone(), cache.lengths.clone()
    CompiledDecoder(model, cache, compile=False).warm_up()
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v) and torch.equal(cache.lengths, lengths)


def test_engine_answers_equal_the_eager_engine_while_requests_come_and_go(model, tokenizer):  # noqa: F811
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in ("hello world", "the sum is", "a", "tool answer seven five")]
    results = []
    for engine in (Engine(model, tokenizer, max_batch=4), uncompiled_engine(model, tokenizer, 4)):
        engine.stop_tokens = set()
        first = [engine.submit(p, GREEDY) for p in prompts[:2]]
        for _ in range(4):
            engine.step()
        later = [engine.submit(prompts[2], GREEDY, n=2), engine.submit(prompts[3], SamplingParams(temperature=0.0, max_tokens=5))]
        while engine.has_work():
            engine.step()
        results.append([[c.tokens for c in collect(r)] for r in first + later])
    assert results[0] == results[1]
    assert [len(t) for answers in results[1] for t in answers] == [14, 14, 14, 14, 5]


def test_the_cli_warm_up_reports_each_batch_size_on_stderr(model, tokenizer, capsys):  # noqa: F811
    warm_up(uncompiled_engine(model, tokenizer, 4))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("compiling the decode step for up to 4 rows")
    assert [line.split(" row(s) (")[1].split(")")[0] for line in lines[1:]] == ["1/3", "2/3", "3/3"]


def test_the_cli_warm_up_is_silent_without_compile(model, tokenizer, capsys):  # noqa: F811
    warm_up(Engine(model, tokenizer, max_batch=4))
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_inductor_compiled_engine_answers_equal_the_eager_engine(tokenizer):  # noqa: F811
    model = random_model(tokenizer.get_vocab_size(), n_kv_head=2)
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in ("hello world", "the sum is tool", "a")]
    answers = []
    for compile in (False, True):
        engine = Engine(model, tokenizer, max_batch=2, compile=compile)
        engine.warm_up()
        engine.stop_tokens = set()
        requests = [engine.submit(p, GREEDY) for p in prompts]
        while engine.has_work():
            engine.step()
        answers.append([collect(r)[0].tokens for r in requests])
    assert answers[0] == answers[1]

