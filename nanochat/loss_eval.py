"""Bits per byte: a loss that does not depend on the tokenizer's vocabulary size."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from nanochat.dataloader import PretrainLoader


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int, token_bytes: torch.Tensor) -> float:
    """Sum of per-token losses (nats) over the bytes those target tokens stand for.

    Special tokens count 0 bytes and are left out, as are ignored targets (-1),
    so the figure compares across tokenizers. Sums are all-reduced across ranks.
    """
    token_bytes = token_bytes.to(next(model.parameters()).device)
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    batches = iter(batches)
    for _ in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            break
        loss = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        counted = nbytes > 0
        total_nats += loss[counted].double().sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        raise ValueError("no evaluation tokens: the split is empty or too small for one batch")
    return total_nats.item() / (math.log(2) * total_bytes.item())


def corpus_bpb(model, tokenizer, split: str, tokens: int, rows: int, seq_len: int, info, directory=None) -> float:
    """Bits per byte on about `tokens` tokens of a pretraining split ("train" or "val"), read once
    from its start in rows x seq_len batches, every rank its own stride (base_train's validation,
    base_loss's two splits).

    Rows are packed best-fit whatever packing the model trained with, so every recipe is measured on
    the same tokens, each row opening at a document's <|bos|> (a model trained on best-fit rows has
    never seen a row open mid-document; one trained on concat rows has seen both). Figures from before
    2026-12 were measured on concat rows and are not comparable.
    """
    steps = max(1, tokens // (rows * seq_len * info.world_size))
    loader = PretrainLoader(tokenizer, rows, seq_len, split, device=info.device, rank=info.rank,
                            world_size=info.world_size, loop=False, directory=directory, packing="best-fit")
    try:
        return evaluate_bpb(model, loader, steps, tokenizer.token_bytes())
    finally:
        loader.close()


# ---------------------------------------------------------------- greedy completions of a few prompts, to eyeball progress during training

# Fixed prompts whose completions show, at a glance, what a base model knows.
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
]


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
    """Continue each prompt greedily; stops early at <|bos|> (a new document)."""
    device = next(model.parameters()).device
    bos = tokenizer.get_bos_token_id()
    completions = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=bos)
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + new], device=device))
            token = int(logits[0, -1].argmax())
            if token == bos:
                break
            new.append(token)
        completions.append(tokenizer.decode(new))
    return completions
