"""Inference: KV-cached generation with continuous batching, sampling and tool use.

A request (a prompt, sampling parameters, n samples) is prefilled once into a
free cache slot and copied to n-1 more; after that its sequences decode in the
same batch as every other running sequence, one token per step. Requests join
and leave between steps, so a long answer never holds up a short one.

When a sequence emits <|python_start|> expr <|python_end|>, the calculator
evaluates expr and <|output_start|> result <|output_end|> is forced into the
stream (the model's own predictions for those steps are discarded).

Two ways to drive it: call `step()` / `generate()` from your own thread (CLI,
evaluation, RL), or start an `EngineWorker` thread and `submit()` from anywhere
(the server). Consumers read `Request.events()` (blocking) or `aevents()`
(asyncio); `cancel()` frees the request's slots at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from nanochat.calculator import evaluate
from nanochat.kv_slots import SlotKVCache
from nanochat.sampling import SamplingParams, make_generator, sample_tokens

log = logging.getLogger("nanochat.engine")

# How tool-use markers read in the visible text: <<expr=result>>, as in GSM8K.
TOOL_MARKERS = {"<|python_start|>": "<<", "<|python_end|>": "=", "<|output_start|>": "", "<|output_end|>": ">>"}
TOOL_CALL_RE = re.compile(r"<<([^<>=]+)=([^<>]*)>>")


def visible_to_parts(text: str) -> str | list[dict]:
    """Turn an answer as shown (tool calls as <<expr=result>>) back into the parts
    render_conversation expects, so multi-turn chats re-render what the model produced."""
    parts, last = [], 0
    for m in TOOL_CALL_RE.finditer(text):
        if m.start() > last:
            parts.append({"type": "text", "text": text[last : m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        parts.append({"type": "python_output", "text": m.group(2)})
        last = m.end()
    if not parts:
        return text
    if last < len(text):
        parts.append({"type": "text", "text": text[last:]})
    return parts


@dataclass
class Event:
    """Something happened to sample `index`: new visible `text` (and the token), or it finished."""

    index: int
    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error"


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str


class Request:
    """One prompt being answered; its events arrive through a queue."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, n: int = 1, loop: asyncio.AbstractEventLoop | None = None):
        self.id = next(self._ids)
        self.prompt, self.params, self.n = list(prompt), params, n
        self.cancelled = False
        self.loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()
        self.completion_tokens = 0

    def cancel(self) -> None:
        self.cancelled = True

    def put(self, item) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, item)
        else:
            self._queue.put(item)

    def events(self):
        """Blocking iterator of Events until every sample finished."""
        finished = 0
        while finished < self.n:
            event = self._queue.get()
            finished += event.finish_reason is not None
            yield event

    def drain(self) -> list[Event]:
        """The events available now, without waiting (for callers that step the engine themselves)."""
        out = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    async def aevents(self):
        finished = 0
        while finished < self.n:
            event = await self._queue.get()
            finished += event.finish_reason is not None
            yield event


@dataclass
class Sequence:
    """One sample of a request, living in one cache slot."""

    request: Request
    index: int
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
    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_len: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        param = next(model.parameters())
        self.device = param.device
        self.max_len = max_len or model.config.sequence_len
        self.cache = SlotKVCache(model.config, max_batch, self.max_len, self.device, model.compute_dtype)
        self.free_slots = list(range(max_batch))
        self.active: list[Sequence] = []
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        special = tokenizer.encode_special
        self.stop_tokens = {special("<|assistant_end|>"), special("<|bos|>")}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.markers = {special(name): text for name, text in TOOL_MARKERS.items()}
        self.tokens_generated = 0
        self.rate_samples: deque = deque(maxlen=4096)  # (time, tokens_generated) after each step

    # ------------------------------------------------------------ requests

    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1, loop=None) -> Request:
        """Queue a request; raises ValueError if it can never fit."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.max_len}")
        if not 1 <= n <= self.cache.slots:
            raise ValueError(f"n must be between 1 and {self.cache.slots}")
        request = Request(prompt, params, n, loop)
        with self.wakeup:
            self.waiting.append(request)
            self.wakeup.notify()
        return request

    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    def queue_depth(self) -> int:
        return len(self.waiting)

    def generate(self, prompt: list[int], params: SamplingParams, n: int = 1) -> list[Completion]:
        """Answer one prompt from the calling thread (no worker may be running)."""
        request = self.submit(prompt, params, n)
        while self.has_work():
            self.step()
        return collect(request, n)

    # ------------------------------------------------------------ scheduling

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits, then decode one token for every running sequence."""
        self._drop_cancelled()
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

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.active if s.request.cancelled]:
            self._finish(seq, "cancelled")
        with self.lock:
            self.waiting = deque(r for r in self.waiting if not r.cancelled)

    def _admit(self) -> None:
        while True:
            with self.lock:
                if not self.waiting or len(self.free_slots) < self.waiting[0].n:
                    return
                request = self.waiting.popleft()
                slots = [self.free_slots.pop(0) for _ in range(request.n)]
            self._prefill(request, sorted(slots))

    def _prefill(self, request: Request, slots: list[int]) -> None:
        first = slots[0]
        ids = torch.tensor([request.prompt], device=self.device)
        logits = self.model(ids, kv_cache=self.cache.prefill_view(first), last_only=True)[0, -1]
        for slot in slots[1:]:
            self.cache.copy_slot(first, slot)
        seqs = [Sequence(request, i, slot, make_generator(request.params.seed, i, self.device)) for i, slot in enumerate(slots)]
        self.active.extend(seqs)
        self.active.sort(key=lambda s: s.slot)
        firsts = sample_tokens(logits.expand(len(seqs), -1), [request.params] * len(seqs), [s.generator for s in seqs])
        for seq, token in zip(seqs, firsts):
            self._accept(seq, token)

    def _decode(self) -> None:
        rows = max(s.slot for s in self.active) + 1
        # built as lists and sent once: writing a tensor element by element costs
        # a dispatch each (a copy to the device each on a GPU)
        last_tokens, running = [0] * rows, [False] * rows
        for seq in self.active:
            last_tokens[seq.slot], running[seq.slot] = seq.tokens[-1], True
        inputs = torch.tensor(last_tokens, device=self.device).view(rows, 1)
        active = torch.tensor(running, device=self.device)
        logits = self.model(inputs, kv_cache=self.cache.decode_view(rows, active))[:, -1]
        sampled = [s for s in self.active if not s.forced]
        slots = [s.slot for s in sampled]
        picked = logits if slots == list(range(rows)) else logits[slots]  # the usual case needs no gather
        choices = sample_tokens(picked, [s.request.params for s in sampled], [s.generator for s in sampled])
        chosen = {id(s): token for s, token in zip(sampled, choices)}
        for seq in list(self.active):
            self._accept(seq, seq.forced.popleft() if seq.forced else chosen[id(seq)])

    # ------------------------------------------------------------ one token

    def _accept(self, seq: Sequence, token: int) -> None:
        """Record `token` for `seq`: stop, run the tool, stream text, or hit a limit."""
        if token in self.stop_tokens and not seq.forced:
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        seq.request.completion_tokens += 1
        self.tokens_generated += 1
        if token == self.python_start:
            seq.tool_start = len(seq.tokens)
        elif token == self.python_end and seq.tool_start is not None:
            self._run_tool(seq)
        self._stream_text(seq, token)
        if seq.finish_reason is None:
            hit_length = len(seq.tokens) >= seq.request.params.max_tokens
            full = len(seq.request.prompt) + len(seq.tokens) >= self.max_len
            if hit_length or full:
                self._finish(seq, "length")

    def _run_tool(self, seq: Sequence) -> None:
        expression = self.tokenizer.decode(seq.tokens[seq.tool_start : -1])
        seq.tool_start = None
        result = evaluate(expression)
        if result is not None:
            seq.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])

    def _stream_text(self, seq: Sequence, token: int) -> None:
        if token in self.markers:
            seq.rendered_prefix += self.tokenizer.decode(seq.tokens[seq.run_start : -1]) + self.markers[token]
            seq.run_start = len(seq.tokens)
        seq.visible = seq.rendered_prefix + self.tokenizer.decode(seq.tokens[seq.run_start :])
        stops = seq.request.params.stop
        cut = min((i for i in (seq.visible.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            seq.visible = seq.visible[:cut]
            self._send(seq, seq.visible, token)
            self._finish(seq, "stop")
            return
        # hold back what could still become a stop string, and a half-decoded character
        safe = len(seq.visible) - max((len(s) - 1 for s in stops), default=0)
        if seq.visible.endswith("\ufffd"):
            safe = min(safe, len(seq.visible) - 1)
        self._send(seq, seq.visible[: max(safe, seq.emitted)], token)

    def _send(self, seq: Sequence, text_upto: str, token: int) -> None:
        delta = text_upto[seq.emitted :]
        seq.emitted = max(seq.emitted, len(text_upto))
        seq.request.put(Event(seq.index, delta, token))

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Flush held-back text, report the reason and free the slot."""
        seq.request.put(Event(seq.index, seq.visible[seq.emitted :], None, reason))
        seq.finish_reason = reason
        self.active.remove(seq)
        self.cache.release(seq.slot)
        with self.lock:
            self.free_slots.append(seq.slot)
            self.free_slots.sort()


def collect(request: Request, n: int) -> list[Completion]:
    """Gather a finished (or finishing) request's events into completions."""
    texts, tokens, reasons = [""] * n, [[] for _ in range(n)], ["stop"] * n
    for event in request.events():
        texts[event.index] += event.text
        if event.token is not None:
            tokens[event.index].append(event.token)
        if event.finish_reason:
            reasons[event.index] = event.finish_reason
    return [Completion(t, k, r) for t, k, r in zip(texts, tokens, reasons)]


class EngineWorker(threading.Thread):
    """Runs the engine's steps in the background while requests are submitted from elsewhere."""

    def __init__(self, engine: Engine):
        super().__init__(daemon=True, name="engine-worker")
        self.engine = engine
        self.stopping = threading.Event()

    def run(self) -> None:
        engine = self.engine
        while not self.stopping.is_set():
            with engine.wakeup:
                if not engine.has_work():
                    engine.wakeup.wait(timeout=0.1)
                    continue
            try:
                engine.step()
            except Exception:  # a bug must not take the server down with it
                log.exception("engine step failed; failing the running requests")
                for seq in list(engine.active):
                    engine._finish(seq, "error")

    def stop(self) -> None:
        self.stopping.set()
        with self.engine.wakeup:
            self.engine.wakeup.notify()
        self.join(timeout=5)
