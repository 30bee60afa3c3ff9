"""Inference: KV-cached generation with continuous batching, sampling and tool use.

A request (one or several prompts, sampling parameters, n samples of each) has each
prompt prefilled once into a free cache slot and copied to n-1 more (requests waiting together share one
prefill pass, right-padded, in batches of up to one context of tokens); after
that its sequences decode in the same batch as every other running sequence,
one token per step. Requests join and leave between steps, so a long answer
never holds up a short one. A request may ask for its prompts' own log-probabilities
(scoring, as evaluation harnesses do), and with max_tokens 0 for nothing else.

When a sequence emits <|python_start|> expr <|python_end|>, the calculator
evaluates expr and <|output_start|> result <|output_end|> is forced into the
stream (the model's own predictions for those steps are discarded).

Two ways to drive it: `submit()` and read the request's events with `step` (CLI,
evaluation, RL: `generate()`), or let an `EngineWorker` step it (in its own thread, or in
yours: chat_service) and `submit()` from anywhere (the server). A request's events are one
queue, read blocking (`Request.events()`, `collect()`) or in an event loop (`abatches()`);
`cancel()` frees the request's slots at the next step.

Faults stay with their request: an exception while one request is admitted,
prefilled, sampled or run through the tool ends that request alone (its
samples finish with "error", `Request.error` says why) and frees its slots;
if the batched forward pass itself fails (a GPU out of memory, say), the
newest request is failed and the step retried without it, so the others
carry on. A request past its deadline ends the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanochat.calculator import evaluate
from nanochat.compiled_decode import CompiledDecoder
from nanochat.conversation import PART_TOKENS, SPECIAL_TOKENS, TOOL_CALL_TOKENS, shown_markers
from nanochat.kv_slots import SlotKVCache
from nanochat.sampling import SamplingParams, make_generator, sample_tokens

log = logging.getLogger("nanochat.engine")
# positions whose full-vocabulary log-probabilities are held at once when scoring a prompt: 512 x a
# 65,536-token vocabulary is 128 MiB of fp32 (twice that with log_softmax's output), whatever the prompt's length
PROMPT_LOGPROB_CHUNK = 512


@dataclass
class TokenLogprob:
    """The log-probability of a token under the model (temperature 1), and its likeliest alternatives;
    None for a prompt's first token, which nothing precedes."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class Event:
    """Something happened to sample `index`: new visible `text` (and the token), or it finished."""

    index: int
    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error" | "cancelled"
    logprob: TokenLogprob | None = None  # when the request asked for logprobs and the model chose the token
    # when the request asked for prompt_logprobs: one entry per prompt token, sent once per sample before its first token
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestError:
    """Why a request ended early; `status` is the HTTP status a server should answer with."""

    status: int
    message: str


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str


class Request:
    """Prompts being answered, n samples each (sample i of prompt p is choice p * n + i). The engine's
    thread puts their events into one queue; a consumer reads it with `events()` (blocking, or stepping
    an engine no worker runs) or, in an event loop, with `abatches()`."""

    _ids = itertools.count()

    def __init__(self, prompts: list[list[int]], params: SamplingParams, n: int = 1, timeout: float | None = None):
        self.id = next(self._ids)
        self.prompts, self.params, self.n = [list(p) for p in prompts], params, n
        self.choices = len(self.prompts) * n
        self.pending = deque(range(len(self.prompts)))  # prompts not yet admitted, in order
        self.cancelled = False
        self.completion_tokens = 0
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.error: RequestError | None = None
        self.finished: set[int] = set()  # sample indices that have ended
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        # Which event wakes abatches() (through `_woken`, in its `_loop`), set before each look at the queue.
        # None, put() wakes nothing: a consumer holding tokens for its stream interval sleeps through them
        # (a wake-up is a syscall and a turn of the GIL, per token and request).
        self._wake_on: Callable[[Event], bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._woken: asyncio.Event | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def fail(self, status: int, message: str) -> None:
        """Record why the request ends early (the first reason wins)."""
        if self.error is None:
            self.error = RequestError(status, message)

    def put(self, event: Event) -> None:
        """From the engine's thread. put() queues before it reads `_wake_on` and abatches() sets it before it
        reads the queue: whichever comes second sees the other, so no wanted event is slept through (and the
        wake-up after put() clears `_wake_on` has abatches() set it again)."""
        self._queue.put(event)
        wake_on = self._wake_on
        if wake_on is not None and wake_on(event):
            self._wake_on = None
            try:
                self._loop.call_soon_threadsafe(self._woken.set)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
                self.cancelled = True

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    def events(self, step: Callable[[], None] | None = None):
        """Events until every sample finished, waiting for the engine's worker; or, given `step` (the
        engine's, when no worker runs it), calling it whenever no event is ready."""
        finished = 0
        while finished < self.choices:
            if step is not None and self._queue.empty():
                step()
                continue
            event = self._queue.get()
            finished += _is_end(event)
            yield event

    async def abatches(self, patience: float | None = None, interval: Callable[[], float] = lambda: 0.0):
        """Lists of events until every sample finished, each what arrived since the list before, and at most
        one list per `interval()` seconds (asked after each list: it may change as load does): a consumer with
        a cost per list (an HTTP chunk) pays it once for several tokens instead of falling behind the engine.
        The first event and every finish go out at once.
        Raises TimeoutError if `patience` seconds pass past the deadline with no event (the engine is stuck)."""
        self._loop, self._woken = asyncio.get_running_loop(), asyncio.Event()
        finished, due = 0, 0.0
        while finished < self.choices:
            batch = await self._take_until(lambda event: True, self._patience_left(patience))
            if not batch:
                raise asyncio.TimeoutError
            hold = due - time.monotonic()
            if hold > 0 and not any(map(_is_end, batch)):  # only a finish ends the hold early
                batch += await self._take_until(_is_end, hold)
            finished += sum(map(_is_end, batch))
            yield batch
            due = time.monotonic() + interval()

    async def _take_until(self, wanted: Callable[[Event], bool], timeout: float | None) -> list[Event]:
        """What the queue holds once it holds a `wanted` event (put() wakes this for one), or after `timeout` seconds."""
        taken, end = [], None if timeout is None else time.monotonic() + timeout
        while True:
            self._woken.clear()  # a wake-up left from before is at worst one more look at the queue
            self._wake_on = wanted
            while not self._queue.empty():
                taken.append(self._queue.get())
            left = None if end is None else end - time.monotonic()
            if any(map(wanted, taken)) or (left is not None and left <= 0):
                self._wake_on = None
                return taken
            try:
                await asyncio.wait_for(self._woken.wait(), left)
            except asyncio.TimeoutError:
                pass

    def _patience_left(self, patience: float | None) -> float | None:
        if self.deadline is None or patience is None:
            return None
        return max(self.deadline - time.monotonic(), 0) + patience


def _is_end(event: Event) -> bool:
    return event.finish_reason is not None


@dataclass
class Admitted:
    """One prompt of a request, taken from the queue with the slots its samples will use."""

    request: Request
    prompt_index: int
    slots: list[int]

    @property
    def prompt(self) -> list[int]:
        return self.request.prompts[self.prompt_index]


@dataclass(eq=False)  # identity: a sequence is found in the running list by what it is, not by comparing its tokens
class Sequence:
    """One sample of a request, living in one cache slot."""

    request: Request
    prompt: list[int]
    index: int  # the request's choice: prompt number * n + sample number
    slot: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    forced: deque = field(default_factory=deque)
    tool_start: int | None = None  # index in tokens just after <|python_start|>
    visible: str = ""  # text so far, tool markers rendered
    rendered_prefix: str = ""  # visible text up to and including the last tool marker
    run_start: int = 0  # index in tokens where the plain text after that marker begins
    emitted: int = 0  # how much of `visible` was sent
    finish_reason: str | None = None


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_len: int | None = None, compile: bool = False):
        """compile: decode with nanochat.compiled_decode instead of the model's own forward over the cache
        (call warm_up() before serving; the weights must not change afterwards)."""
        self.model, self.tokenizer = model, tokenizer
        param = next(model.parameters())
        self.device = param.device
        self.max_len = max_len or model.config.sequence_len
        self.cache = SlotKVCache(model.config, max_batch, self.max_len, self.device, model.compute_dtype)
        self.decoder = CompiledDecoder(model, self.cache) if compile else None
        self.free_slots = list(range(max_batch))
        self.active: list[Sequence] = []
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.closed: RequestError | None = None  # set by close(): new requests are refused with it
        special = tokenizer.encode_special
        self.python_start, self.python_end = (special(name) for name in PART_TOKENS["python"][:2])
        self.output_start, self.output_end = (special(name) for name in PART_TOKENS["python_output"][:2])
        # A token that cannot belong to an answer ends it: <|assistant_end|>, but also <|bos|> or
        # <|user_start|> from a model that runs on into the next turn. Only the call markers may be
        # chosen by the model; the output markers come from the tool (forced), never from the model.
        self.stop_tokens = {special(name) for name in SPECIAL_TOKENS if name not in TOOL_CALL_TOKENS}
        self.markers = {special(name): text for name, text in shown_markers().items()}
        self.tokens_generated = 0
        self.rate_samples: deque = deque(maxlen=4096)  # (time, tokens_generated) after each step

    # ------------------------------------------------------------ requests

    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1, timeout: float | None = None) -> Request:
        """Queue a request for one prompt (see submit_batch)."""
        return self.submit_batch([prompt], params, n, timeout)

    def submit_batch(self, prompts: list[list[int]], params: SamplingParams, n: int = 1, timeout: float | None = None) -> Request:
        """Queue a request for several prompts, admitted one after another as slots free up (those that
        arrive together share prefill passes); raises ValueError if one can never fit, RuntimeError once
        the engine is closed."""
        if not prompts:
            raise ValueError("there are no prompts")
        for i, prompt in enumerate(prompts):
            # a prompt fills the cache only when nothing is to follow it (scoring)
            if not prompt or len(prompt) + min(params.max_tokens, 1) > self.max_len:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; the context holds {self.max_len}"
                                 + (" with room for one more" if params.max_tokens else ""))
        if not 1 <= n <= self.cache.slots:
            raise ValueError(f"n must be between 1 and {self.cache.slots}")
        request = Request(prompts, params, n, timeout)
        with self.wakeup:
            if self.closed is not None:
                raise RuntimeError(self.closed.message)
            self.waiting.append(request)
            self.wakeup.notify()
        return request

    def close(self, status: int, message: str) -> None:
        """Refuse new requests; the next step ends every running and waiting one with `message`."""
        with self.wakeup:
            self.closed = RequestError(status, message)
            self.wakeup.notify()

    def warm_up(self, progress=log.info) -> None:
        """Compile the decode step now (compile=True), so no request waits for it;
        progress(line) hears of each batch size compiled."""
        if self.decoder is not None:
            self.decoder.warm_up(progress)

    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    def queue_depth(self) -> int:
        return len(self.waiting)

    def slots_in_use(self) -> int:
        return self.cache.slots - len(self.free_slots)

    def generate(self, prompt: list[int], params: SamplingParams, n: int = 1) -> list[Completion]:
        """Answer one prompt from the calling thread (no worker may be running)."""
        return collect(self.submit(prompt, params, n), self.step)

    # ------------------------------------------------------------ scheduling

    @torch.inference_mode()
    def step(self) -> None:
        """End what is over, admit what fits, then decode one token for every running sequence."""
        self._end_stopped()
        self._admit()
        if self.active:
            self._decode()
        self.rate_samples.append((time.monotonic(), self.tokens_generated))

    def recent_rate(self, window: float = 10.0) -> float:
        """Tokens per second over the last `window` seconds of work."""
        now = time.monotonic()
        samples = [(t, n) for t, n in list(self.rate_samples) if now - t <= window]  # list(): snapshot under the GIL
        if len(samples) < 2 or samples[-1][0] == samples[0][0]:
            return 0.0
        return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])

    def _end_stopped(self) -> None:
        """Cancelled requests leave quietly; expired ones, and all of them once closed, with an error."""
        now = time.monotonic()
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        for request in {id(s.request): s.request for s in self.active}.values():
            self._end_if_over(request, now)
        for request in waiting:
            if not self._end_if_over(request, now):
                with self.lock:
                    self.waiting.append(request)
        if self.closed is not None:
            with self.lock:  # a submit() that raced close() may have queued one more
                late, self.waiting = list(self.waiting), deque()
            for request in late:
                self.fail_request(request, self.closed.status, self.closed.message)

    def _end_if_over(self, request: Request, now: float) -> bool:
        if request.cancelled:
            self.end_request(request, "cancelled")
        elif self.closed is not None:
            self.fail_request(request, self.closed.status, self.closed.message)
        elif request.deadline is not None and now > request.deadline:
            self.fail_request(request, 504, "the request ran past the server's time limit")
        else:
            return False
        return True

    def _admit(self) -> None:
        """Take every waiting request that fits, in order, and prefill them in batches."""
        admitted = []
        with self.lock:
            while self.waiting and len(self.free_slots) >= self.waiting[0].n:
                request = self.waiting[0]
                if request.pending:  # none left once all are in, or the request was ended
                    admitted.append(Admitted(request, request.pending.popleft(), sorted(self.free_slots.pop(0) for _ in range(request.n))))
                if not request.pending:
                    self.waiting.popleft()
        for group in prefill_groups(admitted, self.max_len):
            self._prefill_isolated(group)

    def _prefill_isolated(self, group: list[Admitted]) -> None:
        group = [item for item in group if not self._ended(item)]
        if not group:
            return
        try:
            logits, seqs = self._prefill(group)
        except Exception as exc:
            if len(group) > 1:  # find the request at fault: each alone, from empty slots again
                for item in group:
                    for slot in item.slots:
                        self.cache.release(slot)
                for one in group:
                    self._prefill_isolated([one])
                return
            item = group[0]  # this prompt alone: a bad parameter, a prompt too long for memory
            log.exception("request %d failed while being admitted", item.request.id)
            self.fail_request(item.request, *_status_of(exc), slots=item.slots)
            return
        self.active.extend(seqs)
        self.active.sort(key=lambda s: s.slot)
        sampled = [row for row, seq in enumerate(seqs) if seq.request.params.max_tokens > 0]
        for seq in seqs:
            if seq.request.params.max_tokens == 0:  # scored, nothing to generate
                self._finish(seq, "length")
        try:
            if sampled:
                self._sample_and_accept(logits if len(sampled) == len(seqs) else logits[sampled], [seqs[r] for r in sampled])
        except Exception as exc:  # not one row's fault (those are caught inside): the whole group
            log.exception("sampling the first tokens failed")
            for item in group:
                self.fail_request(item.request, *_status_of(exc))

    def _ended(self, item: Admitted) -> bool:
        """True (and its slots freed) if the item's request ended while it waited in a prefill group."""
        if item.request.error is None and not item.request.cancelled:
            return False
        for slot in item.slots:
            if slot not in self.free_slots:
                self._free(slot)
        return True

    def _prefill(self, group: list[Admitted]) -> tuple[torch.Tensor, list[Sequence]]:
        """One forward pass over the group's prompts (right-padded), into each one's first slot; its
        other samples get copies. Returns the last-position logits, one row per new sequence; a request
        that asked for its prompt's log-probabilities is sent them first."""
        lengths = [len(item.prompt) for item in group]
        width = max(lengths)
        ids = torch.tensor([item.prompt + [0] * (width - len(item.prompt)) for item in group], device=self.device)
        view = self.cache.prefill_view([item.slots[0] for item in group], lengths)
        last = torch.tensor(lengths, device=self.device) - 1
        scored = [row for row, item in enumerate(group) if item.request.params.prompt_logprobs is not None]
        if scored:
            hidden = self.model.hidden_states(ids, kv_cache=view)
            logits = self.model.logits(hidden[torch.arange(len(group), device=self.device), last])
            prompt_logprobs = {row: self._prompt_logprobs(hidden[row, : lengths[row] - 1], group[row]) for row in scored}
        else:
            logits, prompt_logprobs = self.model(ids, kv_cache=view, logits_at=last)[:, 0], {}
        seqs, rows = [], []
        for row, item in enumerate(group):
            for slot in item.slots[1:]:
                self.cache.copy_slot(item.slots[0], slot)
            n, params = item.request.n, item.request.params
            seqs += [Sequence(item.request, item.prompt, item.prompt_index * n + i, slot, make_generator(params.seed, i, self.device))
                     for i, slot in enumerate(item.slots)]
            rows += [row] * len(item.slots)
            if row in prompt_logprobs:
                for i in range(n):
                    item.request.put(Event(item.prompt_index * n + i, prompt_logprobs=prompt_logprobs[row]))
        return (logits if len(rows) == len(group) else logits[rows]), seqs

    def _prompt_logprobs(self, hidden: torch.Tensor, item: Admitted) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the ones before it (None for the first), with the
        `prompt_logprobs` likeliest; `hidden` holds the final states of all positions but the last.
        A chunk of positions at a time: a full prompt's (positions x vocabulary) logits can be large."""
        k, prompt = item.request.params.prompt_logprobs, item.prompt
        entries = [TokenLogprob(prompt[0], None, None)]
        for start in range(0, hidden.size(0), PROMPT_LOGPROB_CHUNK):
            logp = torch.log_softmax(self.model.logits(hidden[start : start + PROMPT_LOGPROB_CHUNK]), dim=-1)
            targets = torch.tensor(prompt[start + 1 : start + 1 + logp.size(0)], device=logp.device)
            chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
            top_values, top_ids = logp.topk(max(k, 1), dim=-1)
            top_values, top_ids = top_values[:, :k].tolist(), top_ids[:, :k].tolist()
            entries += [TokenLogprob(t, lp, list(zip(ids, values)))
                        for t, lp, ids, values in zip(targets.tolist(), chosen, top_ids, top_values)]
        return entries

    def _decode(self) -> None:
        rows = max(s.slot for s in self.active) + 1
        # built as lists and sent once: writing a tensor element by element costs
        # a dispatch each (a copy to the device each on a GPU)
        last_tokens, running = [0] * rows, [False] * rows
        for seq in self.active:
            last_tokens[seq.slot], running[seq.slot] = seq.tokens[-1], True
        inputs = torch.tensor(last_tokens, device=self.device).view(rows, 1)
        active = torch.tensor(running, device=self.device)
        try:
            if self.decoder is not None:
                logits = self.decoder(inputs, rows, active)
            else:
                logits = self.model(inputs, kv_cache=self.cache.decode_view(rows, active))[:, -1]
        except Exception as exc:
            # The cache advances only after a whole forward pass, so the others can retry this step.
            # Dropping the newest request frees the memory a long prompt took, and stops a bad one.
            newest = max((s.request for s in self.active), key=lambda r: r.id)
            log.exception("decode step failed; ending request %d, the others continue", newest.id)
            self.fail_request(newest, *_status_of(exc))
            return
        forced = [s for s in self.active if s.forced]
        for seq in forced:
            self._accept_isolated(seq, seq.forced.popleft(), forced=True)
        sampled = [s for s in self.active if s not in forced]
        slots = [s.slot for s in sampled]
        picked = logits if slots == list(range(rows)) else logits[slots]  # the usual case needs no gather
        self._sample_and_accept(picked, sampled)

    def _sample_and_accept(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Sample one token per row (row i for seqs[i]) and accept it; a row that fails ends its request only."""
        try:
            choices = sample_tokens(logits, [s.request.params for s in seqs], [s.generator for s in seqs])
        except Exception:  # find the row at fault: each alone
            choices = []
            for row, seq in enumerate(seqs):
                try:
                    choices += sample_tokens(logits[row : row + 1], [seq.request.params], [seq.generator])
                except Exception as exc:
                    log.exception("sampling failed for request %d", seq.request.id)
                    self.fail_request(seq.request, *_status_of(exc))
                    choices.append(None)
        wanted = [row for row, s in enumerate(seqs) if s.request.params.logprobs is not None]
        logprobs = self._logprobs(logits, seqs, choices, wanted) if wanted else {}
        for row, (seq, token) in enumerate(zip(seqs, choices)):
            if token is not None and seq.finish_reason is None:
                self._accept_isolated(seq, token, logprob=logprobs.get(row))

    def _logprobs(self, logits: torch.Tensor, seqs: list[Sequence], choices: list, rows: list[int]) -> dict[int, TokenLogprob]:
        logp = torch.log_softmax(logits[rows].float(), dim=-1)
        top_n = max(seqs[r].request.params.logprobs for r in rows)
        top_values, top_ids = logp.topk(max(top_n, 1), dim=-1)
        out = {}
        for i, row in enumerate(rows):
            if choices[row] is None:
                continue
            n = seqs[row].request.params.logprobs
            top = list(zip(top_ids[i, :n].tolist(), top_values[i, :n].tolist()))
            out[row] = TokenLogprob(choices[row], float(logp[i, choices[row]]), top)
        return out

    # ------------------------------------------------------------ one token

    def _accept_isolated(self, seq: Sequence, token: int, forced: bool = False, logprob: TokenLogprob | None = None) -> None:
        try:
            self._accept(seq, token, forced, logprob)
        except Exception as exc:  # e.g. the tool call, or decoding, on this sequence's tokens
            log.exception("request %d failed on token %d", seq.request.id, token)
            self.fail_request(seq.request, *_status_of(exc))

    def _accept(self, seq: Sequence, token: int, forced: bool = False, logprob: TokenLogprob | None = None) -> None:
        """Record `token` for `seq`: stop, run the tool, stream text, or hit a limit."""
        if token in self.stop_tokens and not forced:
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        seq.request.completion_tokens += 1
        self.tokens_generated += 1
        if token == self.python_start:
            seq.tool_start = len(seq.tokens)
        elif token == self.python_end and seq.tool_start is not None:
            self._run_tool(seq)
        self._stream_text(seq, token, logprob)
        if seq.finish_reason is None:
            hit_length = len(seq.tokens) >= seq.request.params.max_tokens
            full = len(seq.prompt) + len(seq.tokens) >= self.max_len
            if hit_length or full:
                self._finish(seq, "length")

    def _run_tool(self, seq: Sequence) -> None:
        expression = self.tokenizer.decode(seq.tokens[seq.tool_start : -1])
        seq.tool_start = None
        result = evaluate(expression)
        if result is not None:
            seq.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])

    def _stream_text(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        if token in self.markers:
            seq.rendered_prefix += self.tokenizer.decode(seq.tokens[seq.run_start : -1]) + self.markers[token]
            seq.run_start = len(seq.tokens)
        seq.visible = seq.rendered_prefix + self.tokenizer.decode(seq.tokens[seq.run_start :])
        stops = seq.request.params.stop
        cut = min((i for i in (seq.visible.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            seq.visible = seq.visible[:cut]
            self._send(seq, seq.visible, token, logprob)
            self._finish(seq, "stop")
            return
        # hold back what could still become a stop string, and a half-decoded character
        safe = len(seq.visible) - max((len(s) - 1 for s in stops), default=0)
        if seq.visible.endswith("\ufffd"):
            safe = min(safe, len(seq.visible) - 1)
        self._send(seq, seq.visible[: max(safe, seq.emitted)], token, logprob)

    def _send(self, seq: Sequence, text_upto: str, token: int, logprob: TokenLogprob | None) -> None:
        delta = text_upto[seq.emitted :]
        seq.emitted = max(seq.emitted, len(text_upto))
        seq.request.put(Event(seq.index, delta, token, logprob=logprob))

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Flush held-back text, report the reason and free the slot."""
        seq.finish_reason = reason
        self.active.remove(seq)
        self._free(seq.slot)
        seq.request.finished.add(seq.index)
        seq.request.put(Event(seq.index, seq.visible[seq.emitted :], None, reason))

    def _free(self, slot: int) -> None:
        self.cache.release(slot)
        with self.lock:
            self.free_slots.append(slot)
            self.free_slots.sort()

    # ------------------------------------------------------------ ending a request early

    def end_request(self, request: Request, reason: str, slots: list[int] = ()) -> None:
        """Finish every sample of `request` still going with `reason`, freeing its slots
        (and `slots`, taken for it but not yet given to a sequence)."""
        for seq in [s for s in self.active if s.request is request]:
            self._finish(seq, reason)
        for slot in slots:
            if slot not in self.free_slots:
                self._free(slot)
        request.pending.clear()
        for index in range(request.choices):
            if index not in request.finished:
                request.finished.add(index)
                request.put(Event(index, "", None, reason))

    def fail_request(self, request: Request, status: int, message: str, slots: list[int] = ()) -> None:
        request.fail(status, message)
        self.end_request(request, "error", slots)

    def fail_all(self, status: int, message: str) -> None:
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        for request in {id(s.request): s.request for s in self.active}.values():
            self.fail_request(request, status, message)
        for request in waiting:
            self.fail_request(request, status, message)


def prefill_groups(admitted: list[Admitted], budget: int) -> list[list[Admitted]]:
    """Admitted prompts in batches for one prefill each: shortest prompts first, a batch growing while
    its padded size (rows x longest prompt) stays within `budget` tokens (the engine's context, so a batch
    never needs more memory than one full-length prompt would; a longer prompt goes alone)."""
    groups: list[list] = []
    for item in sorted(admitted, key=lambda item: len(item.prompt)):
        if groups and (len(groups[-1]) + 1) * len(item.prompt) <= budget:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _status_of(exc: Exception) -> tuple[int, str]:
    """The HTTP status and message a failed request reports: 503 for running out of memory (retry later), else 500."""
    if isinstance(exc, torch.OutOfMemoryError):
        return 503, "the server ran out of memory for this request; retry with a shorter prompt or fewer tokens"
    return 500, f"generation failed inside the server ({type(exc).__name__})"


def collect(request: Request, step: Callable[[], None] | None = None) -> list[Completion]:
    """A request's events gathered into its completions, one per choice (`step`: see Request.events)."""
    n = request.choices
    texts, tokens, reasons = [""] * n, [[] for _ in range(n)], ["stop"] * n
    for event in request.events(step):
        texts[event.index] += event.text
        if event.token is not None:
            tokens[event.index].append(event.token)
        if event.finish_reason:
            reasons[event.index] = event.finish_reason
    return [Completion(t, k, r) for t, k, r in zip(texts, tokens, reasons)]


class EngineWorker:
    """Steps the engine while requests are submitted from elsewhere: in a thread of its own (`start()`), or
    in the caller's thread (`run()`, until `stop()` or the engine is closed).

    Run it in the thread that loaded the model when you can (chat_service does): torch's OpenMP keeps one
    pool of workers per thread that runs ops, and with a second pool libgomp has more threads than cores
    and stops spinning between parallel regions (the compiled decode step ran ~20% slower, bench/README).
    It sleeps while there is no work (no CPU used when idle). If it ever dies, `failure` says why and
    every request it held has been told."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.stopping = threading.Event()
        self.ended = threading.Event()
        self.failure: str | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True, name="engine-worker")
        self.thread.start()

    def is_alive(self) -> bool:
        """True until run() returns (before it starts too: what is submitted meanwhile waits for it)."""
        return not self.ended.is_set()

    def run(self) -> None:
        engine = self.engine
        try:
            while not self.stopping.is_set():
                with engine.wakeup:
                    if not engine.has_work() and engine.closed is None:
                        engine.wakeup.wait()
                        continue
                try:
                    engine.step()
                except Exception:  # step() isolates requests; this is a bug in the engine itself
                    log.exception("engine step failed; failing the running requests")
                    engine.fail_all(500, "the server's engine failed")
                if engine.closed is not None and not engine.has_work():
                    return
        except BaseException as exc:
            self.failure = f"the engine worker stopped ({type(exc).__name__})"
            engine.close(503, self.failure)
            engine.fail_all(503, self.failure)
            raise
        finally:
            self.ended.set()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)
        else:
            self.ended.wait(timeout)

    def stop(self) -> None:
        self.stopping.set()
        with self.engine.wakeup:
            self.engine.wakeup.notify()
        self.join(timeout=5)
