"""The shapes of OpenAI's answers: chat completions and (legacy) text completions,
whole or streamed as server-sent events, with their logprobs.

A dialect knows one endpoint's JSON; the server's streaming and collecting
loops are shared and ask the dialect for each piece.
"""

from __future__ import annotations

import json
import secrets
import time
from itertools import accumulate

from nanochat.engine import TokenLogprob


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Dialect:
    """What both endpoints share: ids, timestamps, usage, the envelope of a chunk."""

    object: str
    chunk_object: str
    id_prefix: str

    def __init__(self, model: str, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.id, self.created = self.id_prefix + secrets.token_hex(12), int(time.time())

    def envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def whole(self, texts: list[str], reasons: list[str], logprobs: list[list[TokenLogprob]] | None, usage: dict) -> dict:
        choices = [self.choice(i, t, r, None if logprobs is None else logprobs[i]) for i, (t, r) in enumerate(zip(texts, reasons))]
        return self.envelope(self.object, choices, usage=usage)

    def chunk(self, choices: list, **extra) -> str:
        return sse(self.envelope(self.chunk_object, choices, **extra))

    def opening(self, n: int) -> list[str]:
        return []

    def token_text(self, token: int) -> str:
        return self.tokenizer.bytes_of(token).decode("utf-8", errors="replace")


class ChatDialect(Dialect):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def choice(self, index: int, text: str, reason: str, logprobs: list[TokenLogprob] | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                "logprobs": self.logprobs(logprobs)}

    def delta(self, index: int, text: str, reason: str | None, logprobs: list[TokenLogprob] | None) -> dict:
        return {"index": index, "delta": {"content": text} if reason is None else {}, "finish_reason": reason,
                "logprobs": self.logprobs(logprobs)}

    def opening(self, n: int) -> list[str]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])
                for i in range(n)]

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        return {"content": [{**self._entry(e.token, e.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def _entry(self, token: int, logprob: float) -> dict:
        raw = self.tokenizer.bytes_of(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


class TextDialect(Dialect):
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    def choice(self, index: int, text: str, reason: str | None, logprobs: list[TokenLogprob] | None) -> dict:
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": self.logprobs(logprobs)}

    delta = choice

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        tokens = [self.token_text(e.token) for e in entries]
        offsets = list(accumulate(map(len, tokens), initial=0))[:-1]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.top is None else {self.token_text(t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}
