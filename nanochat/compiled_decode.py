"""A compiled decode step for the Engine: one new token for each of B cached rows.

Eager decoding of a small model on a CPU is mostly dispatch overhead and
GEMV kernels far below the memory bandwidth. Compiled by inductor with its
weights frozen into the graph (which lets it prepack them) and max-autotune
(which picks its own C++ GEMM kernels where they beat MKL's), the depth-4
step took 2.1-2.5 ms at 1 row against 7.9-9.0 ms eager, and 5.1-5.5 ms at 8
rows against 12.0-13.5, on the 2-core AMD EPYC (fp32, 2026-12-01, the
experiments behind bench/README.md's inference figures).

The shapes are kept few so compilation is paid once, at warm_up():
- rows are padded to a power of two (1, 2, 4, 8, ... up to the cache's
  slots): one graph each;
- the keys attended, `span`, are a dynamic dimension, rounded up to SPAN_STEP.
The step never writes to the cache: written in place inside the graph, the
cache (a graph input) was copied whole on every step (13.6 ms instead of
6.6). It reads the cached keys below each row's position, attends the new
token's own key separately (one softmax over both), and returns the new keys
and values, which __call__ then stores.

Frozen weights are constants: the model must not change after compiling, so
this is for serving and chatting only (RL samples from the model it trains,
eagerly).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch._inductor.config
import torch.nn as nn

from nanochat.gpt import GPT, norm
from nanochat.kv_slots import SlotKVCache

log = logging.getLogger("nanochat.compiled_decode")

SPAN_STEP = 64  # keys attended are rounded up to this (fewer distinct sizes, never 0 or 1)
# `freezing` is read when a graph is compiled, which happens inside a call; torch.compile's
# options= did not apply it (6.4 ms a step instead of 2.2), so every call patches it in.
FREEZING = {"freezing": True}
COMPILE_OPTIONS = {
    "max_autotune": True,
    # The module guards are half of the per-call overhead (0.35 of ~0.5 ms at 8 rows) and guard
    # nothing here: the frozen graph already assumes the model never changes.
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
}


class DecodeStep(nn.Module):
    """(tokens (B, 1), positions (B,), cached keys and values (L, B, H_kv, span, D))
    -> (logits (B, V), new keys and values (L, B, H_kv, D)); keys at or past a
    row's position are ignored, so the cache may hold anything there."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        model, eps = self.model, self.model.config.norm_eps
        x = norm(model.wte(tokens).to(model.compute_dtype), eps)
        cos, sin = model.rotary_rows(positions[:, None], x.dtype)
        seen = torch.arange(keys.size(3), device=tokens.device)[None, :] < positions[:, None]  # (B, span)
        new_keys, new_values = [], []
        for layer, block in enumerate(model.blocks):
            q, k, v = block.attn.project(norm(x, eps), cos, sin)
            new_keys.append(k[:, :, 0])
            new_values.append(v[:, :, 0])
            x = x + block.attn.merge(attend_with_new(q, keys[layer], values[layer], seen, k, v))
            x = x + block.mlp(norm(x, eps))
        return model.logits(norm(x, eps))[:, 0], torch.stack(new_keys), torch.stack(new_values)


def attend_with_new(q, cached_k, cached_v, seen, k, v) -> torch.Tensor:
    """Attention of one query per row over its cached keys (where `seen`) and its own new key.

    q (B, H, 1, D); cached_k, cached_v (B, H_kv, span, D); seen (B, span); k, v (B, H_kv, 1, D).
    Query heads are grouped over their shared key/value head.
    """
    B, H, _, D = q.shape
    groups = H // k.size(1)
    q = q.view(B, k.size(1), groups, D) * D**-0.5
    old = torch.einsum("bhgd,bhtd->bhgt", q, cached_k).masked_fill(~seen[:, None, None, :], float("-inf"))
    new = (q * k).sum(-1, keepdim=True)  # k (B, H_kv, 1, D) broadcasts over the groups
    weights = torch.softmax(torch.cat((old, new), dim=-1).float(), dim=-1).to(q.dtype)
    span = cached_k.size(2)
    y = torch.einsum("bhgt,bhtd->bhgd", weights[..., :span], cached_v) + weights[..., span:] * v
    return y.reshape(B, H, 1, D)


def bucket_sizes(slots: int) -> list[int]:
    """Row counts a graph is compiled for: the powers of two below `slots`, then `slots`."""
    return [1 << i for i in range(slots.bit_length()) if 1 << i < slots] + [slots]


class CompiledDecoder:
    """What Engine calls instead of the eager model for a decode step, on the same SlotKVCache.
    compile=False runs the same step uncompiled: its code checked in seconds (the tests, bench --smoke)."""

    def __init__(self, model: GPT, cache: SlotKVCache, compile: bool = True):
        self.cache = cache
        self.step = DecodeStep(model).eval()
        if compile:
            self.step = torch.compile(self.step, dynamic=False, options=COMPILE_OPTIONS)
        self.buckets = bucket_sizes(cache.slots)

    def __call__(self, tokens: torch.Tensor, rows: int, active: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) of the next token of slots 0..rows-1; the active ones advance, as with
        SlotKVCache.decode_view."""
        cache = self.cache
        bucket = next(b for b in self.buckets if b >= rows)
        positions = cache.lengths[:bucket]
        highest = int(positions.max())
        cache.room_for_one(highest)  # refuses a full cache, as the eager decode view does
        span = min(-(-max(highest, 1) // SPAN_STEP) * SPAN_STEP, cache.max_len)
        if bucket > rows:  # the padding rows are free slots (length 0): they see nothing and are not kept
            tokens = torch.cat((tokens, tokens.new_zeros(bucket - rows, 1)))
        keys, values = cache.k[:, :bucket, :, :span], cache.v[:, :bucket, :, :span]
        torch._dynamo.mark_dynamic(keys, 3)
        torch._dynamo.mark_dynamic(values, 3)
        with torch._inductor.config.patch(FREEZING):
            logits, new_keys, new_values = self.step(tokens, positions, keys, values)
        cache.store(positions[:rows], new_keys[:, :rows], new_values[:, :rows], active)
        return logits[:rows]

    @torch.inference_mode()
    def warm_up(self, progress: Callable[[str], None] = log.info) -> None:
        """Compile every row bucket now (tens of seconds each on a small CPU), reporting each."""
        start = time.monotonic()
        for done, bucket in enumerate(self.buckets):
            saved = self.cache.lengths.clone()
            self.cache.lengths[:bucket] = 0  # nothing seen, nothing kept: the cache's contents stay valid
            self(torch.zeros(bucket, 1, dtype=torch.long, device=saved.device), bucket, torch.zeros(bucket, dtype=torch.bool, device=saved.device))
            self.cache.lengths.copy_(saved)
            elapsed = time.monotonic() - start
            eta = elapsed / (done + 1) * (len(self.buckets) - done - 1)
            progress(f"compiled the decode step for {bucket} row(s) ({done + 1}/{len(self.buckets)}), "
                     f"{elapsed:.0f} s so far, about {eta:.0f} s to go")
