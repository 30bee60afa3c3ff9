"""Batches of conversations for midtraining (packed) and SFT (padded).

A "task" here is anything with len() and [i] returning a conversation
({"messages": [...]}); tasks/ provides them. Rank r of w reads examples
r, r+w, r+2w, ...; after the last one a new epoch starts at the beginning.
Each source's `state_dict()` says where it stands, so a resumed run continues
with exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import torch

from nanochat.runtime import bucket_length
from nanochat.schedule import PlanError


class _Cursor:
    """Walks one rank's stride of a task, epoch after epoch."""

    def __init__(self, task, rank: int, world_size: int, state: dict | None):
        if len(task) <= rank:
            raise PlanError(f"the data mixture has {len(task)} example(s), too few for rank {rank} of {world_size}")
        self.task, self.rank, self.world = task, rank, world_size
        self.index = state["cursor"] if state else rank
        self.epoch = state["epoch"] if state else 0

    def next_example(self) -> dict:
        if self.index >= len(self.task):
            self.index, self.epoch = self.rank, self.epoch + 1
        example = self.task[self.index]
        self.index += self.world
        return example

    def state(self) -> dict:
        return {"cursor": self.index, "epoch": self.epoch}


def _to_device(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


class PackedConversations:
    """Rendered conversations concatenated and cut into (B, T+1) rows, like pretraining text.

    Every token is a target: midtraining teaches the chat format itself,
    user turns and tool outputs included.
    """

    def __init__(self, tokenizer, task, batch_size: int, seq_len: int, *, device="cpu", rank=0, world_size=1, state=None):
        self.tokenizer, self.rows, self.row_len = tokenizer, batch_size, seq_len + 1
        self.device = torch.device(device)
        self.cursor = _Cursor(task, rank, world_size, state)
        self.buffer: list[int] = list(state["buffer"]) if state else []

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        needed = self.rows * self.row_len
        while len(self.buffer) < needed:
            ids, _ = self.tokenizer.render_conversation(self.cursor.next_example(), max_tokens=self.row_len * 64)
            self.buffer.extend(ids)
        block, self.buffer = self.buffer[:needed], self.buffer[needed:]
        rows = _to_device(torch.tensor(block, dtype=torch.long).view(self.rows, self.row_len), self.device)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {**self.cursor.state(), "buffer": list(self.buffer)}

    @property
    def epoch(self) -> int:
        return self.cursor.epoch


class PaddedConversations:
    """One conversation per row, padded to the longest in the batch rounded up to a
    bucket (runtime.bucket_length: few shapes for a compiled model), at most seq_len + 1 tokens.

    Targets are -1 (no loss) wherever the render mask is 0 (user turns, tool
    outputs, framing) and on padding, so SFT learns only the assistant's part.
    """

    def __init__(self, tokenizer, task, batch_size: int, seq_len: int, *, device="cpu", rank=0, world_size=1, state=None):
        self.tokenizer, self.rows, self.max_len = tokenizer, batch_size, seq_len + 1
        self.device = torch.device(device)
        self.pad = tokenizer.get_bos_token_id()
        self.cursor = _Cursor(task, rank, world_size, state)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rendered = [self.tokenizer.render_conversation(self.cursor.next_example(), max_tokens=self.max_len) for _ in range(self.rows)]
        width = bucket_length(max(len(ids) for ids, _ in rendered) - 1, self.max_len - 1) + 1
        tokens = torch.full((self.rows, width), self.pad, dtype=torch.long)
        learn = torch.zeros((self.rows, width), dtype=torch.bool)
        for r, (ids, mask) in enumerate(rendered):
            tokens[r, : len(ids)] = torch.tensor(ids)
            learn[r, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
        targets = tokens[:, 1:].masked_fill(~learn[:, 1:], -1)
        return _to_device(tokens[:, :-1].contiguous(), self.device), _to_device(targets.contiguous(), self.device)

    def state_dict(self) -> dict:
        return self.cursor.state()

    @property
    def epoch(self) -> int:
        return self.cursor.epoch
