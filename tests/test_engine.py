"""The inference engine: KV cache, batching, sampling, tool use, streaming, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from nanochat.engine import Admitted, Engine, EngineWorker, Event, Request, collect, prefill_groups
from nanochat.gpt import GPT, GPTConfig, build_model
from nanochat.kv_slots import SlotKVCache
from nanochat.sampling import SamplingParams
from nanochat.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def tokenizer():
    words = ["hello", "world", "tool", "answer", "seven", "five", "sum", "is", "the", "a", "b", "2+3", "calc"]
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40)) for i in range(200)]
    return Tokenizer.train_from_iterator(texts, vocab_size=300)


def random_model(vocab_size: int, n_kv_head: int = 2) -> GPT:
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=128, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64), "cpu")
    with torch.no_grad():  # zero-initialised projections would make every position alike
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(tokenizer.get_vocab_size())


@pytest.mark.parametrize("together", [False, True], ids=["prefilled-alone", "prefilled-together-right-padded"])
def test_batched_decode_logits_equal_uncached_recomputation(model, together):
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    cache = SlotKVCache(model.config, slots=4, max_len=32)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        if together:  # the padding's keys land past each slot's length, where nothing reads them
            lengths = [len(p) for p in prompts]
            ids = torch.tensor([p + [0] * (max(lengths) - len(p)) for p in prompts])
            last = model(ids, kv_cache=cache.prefill_view([0, 1, 2], lengths), logits_at=torch.tensor(lengths) - 1)
            assert cache.lengths.tolist() == lengths + [0]
            for i, p in enumerate(prompts):
                torch.testing.assert_close(last[i, 0], model(torch.tensor([p]))[0, -1], atol=1e-5, rtol=1e-5)
        else:
            for slot, p in enumerate(prompts):
                model(torch.tensor([p]), kv_cache=cache.prefill_view([slot]))
        for step in range(5):
            inputs = torch.tensor([[10 + step + i] for i in range(3)])
            active = torch.tensor([True, True, True])
            cached = model(inputs, kv_cache=cache.decode_view(3, active))[:, -1]
            for i in range(3):
                seqs[i].append(10 + step + i)
                full = model(torch.tensor([seqs[i]]))[0, -1]
                torch.testing.assert_close(cached[i], full, atol=1e-5, rtol=1e-5)


def test_batched_greedy_equals_one_at_a_time(model, tokenizer):
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in ("hello world", "the sum is", "a", "tool answer seven five")]
    alone = [Engine(model, tokenizer).generate(p, GREEDY)[0].tokens for p in prompts]
    engine = Engine(model, tokenizer, max_batch=4)
    requests = [engine.submit(p, GREEDY) for p in prompts]
    while engine.has_work():
        engine.step()
    together = [collect(r)[0].tokens for r in requests]
    assert together == alone and all(len(t) == 12 for t in alone)


def test_waiting_prompts_are_prefilled_in_one_forward_pass(model, tokenizer):
    """Shortest first, a batch only as wide as the context holds (rows x longest prompt)."""
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in ("hello world " * 4, "a", "the sum is", "seven " * 35)]
    shapes = []
    hook = model.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        engine = Engine(model, tokenizer, max_batch=4)
        requests = [engine.submit(p, GREEDY) for p in prompts]
        engine.step()
    finally:
        hook.remove()
    short = sorted(len(p) for p in prompts[:3])
    assert 3 * short[-1] <= engine.max_len < 2 * len(prompts[3])  # the long one cannot join them
    assert shapes == [(3, short[-1]), (1, len(prompts[3])), (4, 1)]  # two prefills, then one decode step
    assert all(r.completion_tokens == 2 for r in requests)


def test_prefill_groups_batch_by_padded_size():
    def admitted(length, slot):
        return Admitted(Request([list(range(length))], GREEDY), 0, [slot])

    groups = prefill_groups([admitted(n, slot) for slot, n in enumerate((30, 5, 100, 6, 21))], budget=64)
    assert [[len(item.prompt) for item in g] for g in groups] == [[5, 6, 21], [30], [100]]
    assert [[item.slots for item in g] for g in groups] == [[[1], [3], [4]], [[0]], [[2]]]


def test_more_requests_than_slots_wait_their_turn(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2)
    prompts = [tokenizer.encode(w, prepend="<|bos|>") for w in ("a", "b", "hello", "world", "sum")]
    requests = [engine.submit(p, GREEDY) for p in prompts]
    while engine.has_work():
        engine.step()
        assert len(engine.active) <= 2
    assert [collect(r)[0].tokens for r in requests] == [Engine(model, tokenizer).generate(p, GREEDY)[0].tokens for p in prompts]


def test_sampling_seed_topk_and_samples(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4)
    prompt = tokenizer.encode("hello", prepend="<|bos|>")
    hot = SamplingParams(temperature=1.5, top_k=0, max_tokens=20, seed=123)
    first = engine.generate(prompt, hot, n=3)
    again = engine.generate(prompt, hot, n=3)
    assert [c.tokens for c in first] == [c.tokens for c in again]  # seeded: reproducible
    assert len({tuple(c.tokens) for c in first}) > 1  # samples of one prompt differ
    other = engine.generate(prompt, SamplingParams(temperature=1.5, top_k=0, max_tokens=20, seed=124))
    assert other[0].tokens != first[0].tokens
    top1 = engine.generate(prompt, SamplingParams(temperature=1.5, top_k=1, max_tokens=12, seed=5))
    assert top1[0].tokens == engine.generate(prompt, GREEDY)[0].tokens
    tiny_p = engine.generate(prompt, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=12, seed=9))
    assert tiny_p[0].tokens == engine.generate(prompt, GREEDY)[0].tokens


def test_limits_and_stop_strings(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello", prepend="<|bos|>")
    full = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=30))[0]
    assert full.finish_reason == "length" and len(full.tokens) == 30
    stop = full.text[5:8]
    cut = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    near_context = engine.generate(list(range(1, 120)), SamplingParams(temperature=0, max_tokens=100))[0]
    assert near_context.finish_reason == "length" and len(near_context.tokens) == 128 - 119
    with pytest.raises(ValueError, match="context"):
        engine.submit(list(range(1, 200)), GREEDY)


def test_streamed_events_reassemble_the_answer(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("the sum", prepend="<|bos|>")
    request = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=15))
    events = list(request.events(engine.step))  # the CLI's way: step while no event is ready
    pieces = [e.text for e in events]
    assert "".join(pieces) == engine.generate(prompt, SamplingParams(temperature=0, max_tokens=15))[0].text
    assert events[-1].finish_reason == "length" and sum(e.token is not None for e in events) == 15


def test_cancel_frees_the_slot(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    prompt = tokenizer.encode("hello", prepend="<|bos|>")
    first = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=100))
    second = engine.submit(prompt, GREEDY)
    engine.step()
    assert engine.active[0].request is first
    first.cancel()
    engine.step()
    assert engine.active and engine.active[0].request is second
    while engine.has_work():
        engine.step()
    assert collect(first)[0].finish_reason == "cancelled"
    assert len(collect(second)[0].tokens) == 12


def test_worker_serves_concurrent_submitters(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4)
    prompts = [tokenizer.encode(w, prepend="<|bos|>") for w in ("a", "b", "hello", "world", "sum", "tool")]
    expected = [Engine(model, tokenizer).generate(p, GREEDY)[0].tokens for p in prompts]
    worker = EngineWorker(engine)
    worker.start()
    results = [None] * len(prompts)

    def client(i):
        results[i] = collect(engine.submit(prompts[i], GREEDY))[0].tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    worker.stop()
    assert results == expected


def test_a_worker_can_step_in_the_callers_thread_until_stopped(model, tokenizer):
    """chat_service's way: the thread that loaded the model steps it; requests come from other threads."""
    engine = Engine(model, tokenizer, max_batch=2)
    prompt = tokenizer.encode("hello", prepend="<|bos|>")
    worker = EngineWorker(engine)
    results = []
    client = threading.Thread(target=lambda: (results.append(collect(engine.submit(prompt, GREEDY))[0].tokens), worker.stop()))
    client.start()
    worker.run()  # returns once the client has its answer and stopped it
    client.join(timeout=10)
    assert results == [Engine(model, tokenizer).generate(prompt, GREEDY)[0].tokens]
    assert not worker.is_alive()


def _batches(events_at: list[tuple[float, Event]], interval: float, n: int = 1) -> list[tuple[float, list[Event]]]:
    """What abatches yields, with when, for events put from another thread at the given offsets (seconds)."""

    async def consume():
        request = Request([[1]], GREEDY, n=n)
        started = time.monotonic()

        def produce():
            for at, event in events_at:
                time.sleep(max(0.0, started + at - time.monotonic()))
                request.put(event)

        threading.Thread(target=produce, daemon=True).start()
        return [(time.monotonic() - started, batch) async for batch in request.abatches(patience=None, interval=lambda: interval)]

    return asyncio.run(consume())


def test_abatches_gives_what_arrived_together_in_one_list():
    events = [Event(0, "ab"[i % 2], token=i) for i in range(6)] + [Event(0, "", None, "stop")]

    async def consume():
        request = Request([[1]], GREEDY)
        for event in events:  # all there before the consumer looks, as when it fell behind the engine
            request.put(event)
        return [batch async for batch in request.abatches()]

    assert asyncio.run(consume()) == [events]


def test_abatches_holds_tokens_for_the_interval_but_never_the_first_or_the_end():
    first, later = Event(0, "a", token=1), [Event(0, "b", token=i) for i in range(2, 6)]
    end = Event(0, "", None, "length")
    got = _batches([(0.0, first)] + [(0.05 * i, e) for i, e in enumerate(later, 1)] + [(1.3, Event(0, "c", token=9)), (1.35, end)],
                   interval=1.0)
    (t0, b0), (t1, b1), (t2, b2) = got
    assert b0 == [first] and t0 < 0.5  # the first token at once
    assert b1 == later and 0.9 < t1 < 1.3  # the next four together, one interval after the first
    assert b2 == [Event(0, "c", token=9), end] and t2 < 1.9  # the end goes out when it comes, not an interval later


def test_abatches_waits_for_every_sample_to_finish():
    events = [(0.0, Event(1, "x", token=5)), (0.0, Event(1, "", None, "stop")), (0.2, Event(0, "y", token=6)), (0.2, Event(0, "", None, "stop"))]
    got = _batches(events, interval=0.0, n=2)
    assert [e for _, batch in got for e in batch] == [e for _, e in events]


def test_a_reader_whose_event_loop_closed_has_its_request_cancelled():
    """A server gone mid-answer: the engine's next event finds nobody listening and the request is let go."""
    request, loop = Request([[1]], GREEDY), asyncio.new_event_loop()

    async def first_batch():
        return await anext(request.abatches())

    reader = loop.create_task(first_batch())
    loop.run_until_complete(asyncio.sleep(0.05))  # the reader waits for an event
    reader.cancel()
    loop.run_until_complete(asyncio.gather(reader, return_exceptions=True))
    loop.close()
    request.put(Event(0, "a", token=1))
    assert request.cancelled


def test_tool_call_output_comes_from_the_calculator(tokenizer):
    """A tiny model overfit on a conversation whose tool output is WRONG (2+3 -> 7):
    the engine must force the calculator's 5 instead of the model's 7."""
    conversation = {"messages": [
        {"role": "user", "content": "calc"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "sum"}, {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "7"}, {"type": "text", "text": " answer"},
        ]},
    ]}
    ids, _ = tokenizer.render_conversation(conversation)
    model = random_model(tokenizer.get_vocab_size())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    for _ in range(150):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert loss.item() < 0.05
    prompt = tokenizer.render_for_completion(conversation)
    answer = Engine(model, tokenizer).generate(prompt, SamplingParams(temperature=0, max_tokens=30))[0]
    assert answer.text == "sum<<2+3=5>> answer"
    assert answer.finish_reason == "stop"
    assert tokenizer.encode_special("<|output_start|>") in answer.tokens


def test_the_prompts_of_one_request_share_a_prefill_and_are_scored_as_a_full_forward_scores_them(model, tokenizer):
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in ("hello world", "the sum is five", "a")]
    shapes = []
    hook = model.wte.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        engine = Engine(model, tokenizer, max_batch=4)
        scored = engine.submit_batch(prompts, SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=2))
        engine.step()
    finally:
        hook.remove()
    assert shapes == [(3, max(map(len, prompts)))] and not engine.has_work()  # one pass, nothing left to decode
    events = list(scored.events())
    assert [e.finish_reason for e in events if e.finish_reason] == ["length"] * 3
    assert not any(e.token for e in events)
    for index, prompt in enumerate(prompts):
        [entries] = [e.prompt_logprobs for e in events if e.index == index and e.prompt_logprobs]
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([prompt]))[0, :-1], dim=-1)
        assert [e.token for e in entries] == prompt and entries[0].logprob is None and entries[0].top is None
        for position, entry in enumerate(entries[1:]):
            assert entry.logprob == pytest.approx(float(expected[position, prompt[position + 1]]), abs=1e-4)
            assert [t for t, _ in entry.top] == expected[position].topk(2).indices.tolist()


def test_samples_of_several_prompts_are_numbered_prompt_by_prompt(model, tokenizer):
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in ("hello world", "the sum is")]
    engine = Engine(model, tokenizer, max_batch=2)  # room for one prompt's two samples at a time
    request = engine.submit_batch(prompts, GREEDY, n=2)
    while engine.has_work():
        engine.step()
    answers = [c.tokens for c in collect(request)]
    alone = [Engine(model, tokenizer).generate(p, GREEDY)[0].tokens for p in prompts]
    assert answers == [alone[0], alone[0], alone[1], alone[1]]
