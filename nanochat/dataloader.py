"""Pretraining batches: documents -> tokens (in a background thread) -> packed rows.

Every document starts with `<|bos|>`; documents are concatenated and cut into
rows of T+1 tokens, so inputs are row[:-1] and targets row[1:]. The loader's
state (the data position of the last document batch it absorbed plus the
tokens it has not yet handed out) is enough to continue with exactly the
tokens an uninterrupted run would have seen.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from nanochat.dataset import DataPosition, iter_document_batches

_DONE = object()


class _Producer(threading.Thread):
    """Reads and tokenizes document batches ahead of the training loop.

    tiktoken releases the GIL while encoding, so this overlaps with the step.
    Errors are handed to the consumer instead of dying silently in the thread.
    """

    def __init__(self, tokenizer, docs: Iterator, depth: int = 4, num_threads: int = 4):
        super().__init__(daemon=True, name="tokenizer-producer")
        self.tokenizer, self.docs, self.num_threads = tokenizer, docs, num_threads
        self.out: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()

    def run(self) -> None:
        bos = self.tokenizer.get_bos_token_id()
        try:
            for texts, position in self.docs:
                ids = self.tokenizer.encode(texts, prepend=bos, num_threads=self.num_threads)
                tokens = np.fromiter((t for doc in ids for t in doc), dtype=np.int64)
                if not self._put((tokens, position)):
                    return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._put(exc)

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class PretrainLoader:
    """Iterator of (inputs, targets) of shape (B, T) on `device`, for one rank.

    `state` (from `state_dict()`) resumes exactly; `loop` repeats the split
    forever (training) or stops at its end (evaluation).
    """

    def __init__(
        self,
        tokenizer,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        *,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        loop: bool = True,
        docs_per_batch: int = 128,
        directory=None,
    ):
        self.rows, self.row_len = batch_size, seq_len + 1
        self.device = torch.device(device)
        start = DataPosition.from_dict(state["position"]) if state else None
        self.position = start or DataPosition()
        self.buffer = np.asarray(state["buffer"], dtype=np.int64) if state else np.empty(0, dtype=np.int64)
        docs = iter_document_batches(
            split, directory=directory, rank=rank, world_size=world_size, start=start, batch_size=docs_per_batch, loop=loop
        )
        self.producer = _Producer(tokenizer, docs)
        self.producer.start()
        self.exhausted = False

    def state_dict(self) -> dict:
        """Where the next batch will come from: position of the last absorbed document batch and leftover tokens."""
        return {"position": self.position.to_dict(), "buffer": self.buffer.tolist()}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        needed = self.rows * self.row_len
        while len(self.buffer) < needed and not self.exhausted:
            self._absorb_next()
        if len(self.buffer) < needed:
            raise StopIteration
        block, self.buffer = self.buffer[:needed], self.buffer[needed:]
        rows = torch.from_numpy(block).view(self.rows, self.row_len)
        if self.device.type == "cuda":
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        else:
            rows = rows.to(self.device)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _absorb_next(self) -> None:
        item = self.producer.out.get()
        if item is _DONE:
            self.exhausted = True
            return
        if isinstance(item, BaseException):
            self.close()
            raise item
        tokens, self.position = item
        self.buffer = np.concatenate([self.buffer, tokens])

    def close(self) -> None:
        """Stop the background thread (it may be blocked on a full queue)."""
        self.producer.stopping.set()
        self.producer.join(timeout=5)

    def __del__(self):
        producer = getattr(self, "producer", None)
        if producer is not None:
            producer.stopping.set()
