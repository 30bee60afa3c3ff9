"""Faults stay with their request: whatever goes wrong with one (admission, prefill, sampling, a failed
decode step, a deadline, a closing server, a dead worker) ends it alone, frees its slots, and the others
get exactly the answers they would have had alone. Also: logprobs, and special tokens ending a turn."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from nanochat.conversation import SPECIAL_TOKENS
from nanochat.engine import Engine, EngineWorker, collect
from nanochat.sampling import SamplingParams
from nanochat.tokenizer import Tokenizer
from test_engine import random_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def tokenizer():
    words = ["hello", "world", "tool", "answer", "seven", "five", "sum", "is", "the", "a", "b"]
    texts = [" ".join(words[(i * 5 + j * 3) % len(words)] for j in range(40)) for i in range(100)]
    return Tokenizer.train_from_iterator(texts, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(tokenizer.get_vocab_size())


class Faulty(torch.nn.Module):
    """The real model, except that `rule(ids)` may raise instead of running it, or `bias(logits)` may change its output."""

    def __init__(self, model, rule=None, bias=None):
        super().__init__()
        self.inner, self.rule, self.bias = model, rule, bias
        self.config, self.compute_dtype = model.config, model.compute_dtype

    def forward(self, ids, **kwargs):
        if self.rule is not None:
            self.rule(ids)
        logits = self.inner(ids, **kwargs)
        return logits if self.bias is None else self.bias(ids, logits)


def slipped(params: SamplingParams, **fields) -> SamplingParams:
    """`params` with values that validation would refuse, as if a bug had let them through."""
    params = dataclasses.replace(params)
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


def prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, prepend="<|bos|>")


def alone(model, tokenizer, text: str, params=GREEDY) -> list[int]:
    return Engine(model, tokenizer).generate(prompt(tokenizer, text), params)[0].tokens


def run_dry(engine: Engine) -> None:
    while engine.has_work():
        engine.step()


def assert_clean(engine: Engine) -> None:
    assert not engine.active and not engine.waiting and engine.free_slots == list(range(engine.cache.slots))


def test_a_bad_seed_fails_its_request_alone_and_a_full_width_request_still_runs(model, tokenizer):
    """The issue's wedge: a seed the sampler cannot take, then a request as wide as --max-batch."""
    engine = Engine(model, tokenizer, max_batch=2)
    worker = EngineWorker(engine)
    worker.start()
    try:
        good = engine.submit(prompt(tokenizer, "hello"), GREEDY)
        bad = engine.submit(prompt(tokenizer, "world"), slipped(GREEDY, seed="not a number"))
        wide = engine.submit(prompt(tokenizer, "sum"), GREEDY, n=2)
        assert [c.finish_reason for c in collect(bad)] == ["error"]
        assert bad.error.status == 500 and "TypeError" in bad.error.message
        assert collect(good)[0].tokens == alone(model, tokenizer, "hello")
        assert [c.tokens for c in collect(wide)] == [alone(model, tokenizer, "sum")] * 2
        time.sleep(0.2)
        assert_clean(engine)
        cpu = time.process_time()
        time.sleep(1.0)
        assert time.process_time() - cpu < 0.05  # an idle worker sleeps: no spinning on an orphan
    finally:
        worker.stop()


def test_a_prefill_out_of_memory_ends_that_request_with_503(model, tokenizer):
    """The two are prefilled together first; when that fails, each alone, so only the long one fails."""
    long_prompt = prompt(tokenizer, "the answer is " * 10)
    prefills = []

    def rule(ids):
        if ids.size(1) > 1:
            prefills.append(ids.size(0))
        if ids.size(1) == len(long_prompt):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine = Engine(Faulty(model, rule), tokenizer, max_batch=2)
    ok = engine.submit(prompt(tokenizer, "hello"), GREEDY)
    doomed = engine.submit(long_prompt, GREEDY)
    run_dry(engine)
    assert collect(doomed)[0].finish_reason == "error"
    assert doomed.error.status == 503 and "memory" in doomed.error.message
    assert collect(ok)[0].tokens == alone(model, tokenizer, "hello")
    assert prefills == [2, 1, 1]
    assert_clean(engine)


def test_a_failure_sampling_a_prefilled_group_ends_that_group_and_frees_its_slots(model, tokenizer):
    """Not one row's fault (a bug past the per-row guards): the requests prefilled together end, the engine goes on."""
    engine = Engine(model, tokenizer, max_batch=2)
    real, calls = engine._logprobs, []

    def broken(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in logprobs")
        return real(*args)

    engine._logprobs = broken
    params = dataclasses.replace(GREEDY, logprobs=1)
    group = [engine.submit(prompt(tokenizer, text), params) for text in ("hello", "sum")]
    run_dry(engine)
    for request in group:
        assert collect(request)[0].finish_reason == "error"
        assert request.error.status == 500 and "RuntimeError" in request.error.message
    assert_clean(engine)
    later = engine.submit(prompt(tokenizer, "hello"), params)
    run_dry(engine)
    assert collect(later)[0].tokens == alone(model, tokenizer, "hello")
    assert_clean(engine)


def test_a_failed_decode_step_drops_the_newest_request_and_the_older_one_is_unharmed(model, tokenizer):
    failures = []

    def rule(ids):
        if ids.size(0) == 2 and ids.size(1) == 1 and not failures:  # the first two-row decode step
            failures.append(True)
            raise RuntimeError("kernel failed")

    engine = Engine(Faulty(model, rule), tokenizer, max_batch=2)
    older = engine.submit(prompt(tokenizer, "hello"), GREEDY)
    engine.step()
    newer = engine.submit(prompt(tokenizer, "world"), GREEDY)
    run_dry(engine)
    assert failures and collect(newer)[0].finish_reason == "error" and newer.error.status == 500
    assert collect(older)[0].tokens == alone(model, tokenizer, "hello")
    assert_clean(engine)


def test_a_sampling_failure_ends_only_the_row_at_fault(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=3)
    hot = SamplingParams(temperature=1.0, top_k=20, max_tokens=12, seed=7)
    fine = engine.submit(prompt(tokenizer, "hello"), hot)
    broken = engine.submit(prompt(tokenizer, "world"), slipped(hot, top_k="twenty"))
    greedy = engine.submit(prompt(tokenizer, "sum"), GREEDY)
    run_dry(engine)
    assert collect(broken)[0].finish_reason == "error"
    assert collect(fine)[0].tokens == alone(model, tokenizer, "hello", hot)
    assert collect(greedy)[0].tokens == alone(model, tokenizer, "sum")
    assert_clean(engine)


def test_deadline_and_close_end_running_and_waiting_requests(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    late = engine.submit(prompt(tokenizer, "hello"), GREEDY, timeout=0.0)
    engine.step()
    assert collect(late)[0].finish_reason == "error" and late.error.status == 504
    running = engine.submit(prompt(tokenizer, "hello"), dataclasses.replace(GREEDY, max_tokens=100))
    queued = engine.submit(prompt(tokenizer, "world"), GREEDY)
    engine.step()
    engine.close(503, "the server is shutting down")
    engine.step()
    for request in (running, queued):
        assert collect(request)[0].finish_reason == "error"
        assert (request.error.status, request.error.message) == (503, "the server is shutting down")
    assert_clean(engine)
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(prompt(tokenizer, "sum"), GREEDY)


class Crash(BaseException):
    """Not an Exception: nothing in the engine may swallow it, so the worker thread dies."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_tells_its_requests_and_closes_the_engine(model, tokenizer):
    def rule(ids):
        if ids.size(1) == 1:
            raise Crash()

    engine = Engine(Faulty(model, rule), tokenizer, max_batch=2)
    worker = EngineWorker(engine)
    worker.start()
    request = engine.submit(prompt(tokenizer, "hello"), GREEDY)
    assert collect(request)[0].finish_reason == "error" and request.error.status == 503
    worker.join(timeout=10)
    assert not worker.is_alive() and "Crash" in worker.failure
    with pytest.raises(RuntimeError, match="Crash"):
        engine.submit(prompt(tokenizer, "world"), GREEDY)


def test_logprobs_are_the_models_own(model, tokenizer):
    ids = prompt(tokenizer, "hello world")
    engine = Engine(model, tokenizer)
    request = engine.submit(ids, dataclasses.replace(GREEDY, logprobs=3))
    run_dry(engine)
    events = [e for e in request.events() if e.token is not None]
    tokens = [e.token for e in events]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + tokens])).float(), dim=-1)[0, len(ids) - 1 : -1]
    for row, event in enumerate(events):
        top_values, top_ids = logp[row].topk(3)
        assert event.logprob.token == event.token == int(top_ids[0])  # greedy picks the likeliest
        assert event.logprob.logprob == pytest.approx(float(logp[row, event.token]), abs=1e-4)
        assert [t for t, _ in event.logprob.top] == top_ids.tolist()
        assert [v for _, v in event.logprob.top] == pytest.approx(top_values.tolist(), abs=1e-4)


@pytest.mark.parametrize("name", [n for n in SPECIAL_TOKENS if n not in ("<|python_start|>", "<|python_end|>")])
def test_a_special_token_from_the_model_ends_the_turn_and_is_never_shown(model, tokenizer, name):
    special = tokenizer.encode_special(name)
    steps = []

    def bias(ids, logits):
        steps.append(ids.size(1))
        if len(steps) == 4:  # the third decode step picks the special token
            logits = logits.clone()
            logits[..., special] = 1e4
        return logits

    engine = Engine(Faulty(model, bias=bias), tokenizer)
    answer = engine.generate(prompt(tokenizer, "hello"), dataclasses.replace(GREEDY, max_tokens=30))[0]
    assert answer.finish_reason == "stop" and len(answer.tokens) == 3 and special not in answer.tokens
    assert "<|" not in answer.text
