"""Choosing the next token: temperature, top-k, top-p, reproducible with a seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


SEED_RANGE = 2**63  # seeds are signed 64-bit, as OpenAI's are; torch.Generator takes them modulo 2^64
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = 50  # None or 0: no limit
    top_p: float = 1.0
    max_tokens: int = 512  # 0: none, the prompt is only scored (prompt_logprobs)
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: int | None = None  # None: none; k: the chosen token's and the k likeliest (OpenAI allows 0-20)
    prompt_logprobs: int | None = None  # the same for each prompt token, given the ones before it

    def __post_init__(self):
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.seed is not None and not -SEED_RANGE <= self.seed < SEED_RANGE:
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {value}")


def make_generator(seed: int | None, sample_index: int, device: torch.device) -> torch.Generator:
    """Sample i of a seeded request gets seed + i, so n samples differ yet repeat run to run."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed((seed + sample_index) % 2**64)
    return gen


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row of `logits` (rows, vocab), each row with its own parameters.

    All rows are filtered and normalised in one batch; each row then draws one
    uniform number from its own generator and picks by inverse CDF, so a seeded
    sequence samples the same tokens whatever else is in the batch.
    """
    greedy = logits.argmax(dim=-1).tolist()
    hot = [i for i, p in enumerate(params) if p.temperature > 0]
    if not hot:
        return greedy
    vocab = logits.size(-1)
    rows = logits[hot].float()
    temps = torch.tensor([params[i].temperature for i in hot], device=logits.device)
    ks = torch.tensor([min(params[i].top_k or vocab, vocab) for i in hot], device=logits.device)
    top_ps = torch.tensor([params[i].top_p for i in hot], device=logits.device)
    values, indices = torch.topk(rows / temps[:, None], int(ks.max()))
    rank = torch.arange(values.size(1), device=logits.device)
    values = values.masked_fill(rank[None, :] >= ks[:, None], float("-inf"))
    probs = torch.softmax(values, dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token always stays)
    probs = probs * ((torch.cumsum(probs, dim=-1) - probs) < top_ps[:, None])
    cdf = torch.cumsum(probs, dim=-1)
    draws = torch.cat([torch.rand(1, generator=generators[i], device=logits.device) for i in hot]) * cdf[:, -1]
    picks = torch.searchsorted(cdf, draws[:, None]).clamp(max=values.size(1) - 1)
    for row, i in enumerate(hot):
        greedy[i] = int(indices[row, picks[row, 0]])
    return greedy
