"""Greedy completions of a few prompts, to eyeball progress during training."""

from __future__ import annotations

import torch

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
