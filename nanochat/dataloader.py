"""Pretraining batches: documents -> tokens (in a background thread) -> rows of T+1 tokens.

Every document is tokenized with `<|bos|>` in front; inputs are row[:-1] and
targets row[1:]. Two ways to pack documents into rows (`PACKINGS`):

- "best-fit" (the default): every row starts at a document's `<|bos|>`. For the
  row being filled, the longest pending document that fits the space left goes
  in whole; when none fits, the shortest pending document (it wastes the least)
  is cropped to fill the row exactly and the rest of it is dropped, never
  carried into the next row.
  Documents longer than a row are cropped the same way. No padding: every token
  of every row trains. Pending documents are topped up to `buffer_docs` before
  each placement; 1,000 is the buffer of the public implementation (the
  karpathy/nanochat development log), not tuned here. A split of fewer
  documents than that is held several epochs deep.
- "concat": documents end to end, cut every T+1 tokens. Nothing is dropped, but
  most rows start in the middle of a document. The recipe before 2026-12, kept
  for the A/B benchmark.

Midtraining and SFT pack conversations their own way (nanochat/chat_data.py).

Resume: `state_dict()` is the data position after the last document batch the
loader absorbed plus what its packer holds back (concat: the leftover tokens;
best-fit: the pending documents as lists of token ids, in arrival order). A
loader built with that state yields exactly the rows an uninterrupted one
would: every packing decision depends on that state alone, never on how far
the background thread has read. Size: best-fit holds up to buffer_docs +
docs_per_batch documents, and the long ones linger (they leave only when
nothing else fits), so the state is ~1M token ids, written as JSON per rank in
each checkpoint: 9.7 MB at seq len 2048 and 12.7 MB at 512 on the shared book
corpus (1,403 tokens per document on average, 65,536-token vocabulary).

CLI:  python -m nanochat.dataloader DIR --seq-len 2048 512
      prints what each packing costs on the train shards in DIR (see `packing_stats`).
Exit codes: 0 done, 1 no shards in DIR, 2 no tokenizer.
"""

from __future__ import annotations

import argparse
import math
import queue
import sys
import threading
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from nanochat.dataset import DataPosition, iter_document_batches
from nanochat.flags import FlagParser
from nanochat.tokenizer import Tokenizer, TokenizerError, get_tokenizer

PACKINGS = ("best-fit", "concat")
DEFAULT_PACKING = "best-fit"
BEST_FIT_BUFFER_DOCS = 1000

_DONE = object()


class DataStateError(ValueError):
    """A saved loader state that this loader cannot continue from."""


class _Concat:
    """Documents end to end, cut into rows; holds back the tokens not yet handed out."""

    def __init__(self, row_len: int, held: list[int] | None):
        self.row_len = row_len
        self.tokens = np.asarray(held if held is not None else [], dtype=np.int64)

    @staticmethod
    def prepare(ids: list[list[int]]) -> np.ndarray:
        return np.fromiter((t for doc in ids for t in doc), dtype=np.int64)

    def absorb(self, tokens: np.ndarray) -> None:
        self.tokens = np.concatenate([self.tokens, tokens])

    def take(self, rows: int, more: Callable[[], bool]) -> np.ndarray | None:
        needed = rows * self.row_len
        while len(self.tokens) < needed and more():
            pass
        if len(self.tokens) < needed:
            return None
        block, self.tokens = self.tokens[:needed], self.tokens[needed:]
        return block.reshape(rows, self.row_len)

    def held(self) -> dict:
        return {"buffer": self.tokens.tolist()}


class _BestFit:
    """Rows that each start at a document: longest pending document that fits, else crop the shortest.

    `lengths` is kept sorted as (length, arrival) so both choices are a bisect,
    not a scan of the buffer; ties go to the document that arrived first.
    """

    def __init__(self, row_len: int, buffer_docs: int, held: list[list[int]] | None):
        if buffer_docs < 1:
            raise ValueError(f"buffer_docs must be at least 1, got {buffer_docs}")
        self.row_len, self.buffer_docs = row_len, buffer_docs
        self.docs: dict[int, np.ndarray] = {}  # arrival number -> tokens; a dict keeps arrival order
        self.lengths: list[tuple[int, int]] = []
        self.arrivals = 0
        self.cropped_docs = self.cropped_tokens = 0  # for packing_stats
        self.absorb(self.prepare(held or []))

    @staticmethod
    def prepare(ids: list[list[int]]) -> list[np.ndarray]:
        return [np.asarray(doc, dtype=np.int64) for doc in ids]

    def absorb(self, docs: list[np.ndarray]) -> None:
        for doc in docs:
            self.docs[self.arrivals] = doc
            self.lengths.insert(bisect_left(self.lengths, (len(doc), self.arrivals)), (len(doc), self.arrivals))
            self.arrivals += 1

    def take(self, rows: int, more: Callable[[], bool]) -> np.ndarray | None:
        """`rows` full rows; when the documents run out, the rows completed so far (a short last batch,
        so a small validation split still gives what it holds), then None."""
        out = np.empty((rows, self.row_len), dtype=np.int64)
        for done, row in enumerate(out):
            filled = 0
            while filled < self.row_len:
                while len(self.docs) < self.buffer_docs and more():
                    pass
                if not self.docs:
                    return out[:done] if done else None
                doc = self._pop_longest_fitting(self.row_len - filled)
                if doc is None:  # nothing fits: crop the shortest
                    doc = self._pop(0)
                    self.cropped_docs += 1
                    self.cropped_tokens += len(doc) - (self.row_len - filled)
                    doc = doc[: self.row_len - filled]
                row[filled : filled + len(doc)] = doc
                filled += len(doc)
        return out

    def _pop_longest_fitting(self, space: int) -> np.ndarray | None:
        end = bisect_right(self.lengths, (space, math.inf))
        if end == 0:
            return None
        return self._pop(bisect_left(self.lengths, (self.lengths[end - 1][0], -1)))

    def _pop(self, index: int) -> np.ndarray:
        _, arrival = self.lengths.pop(index)
        return self.docs.pop(arrival)

    def held(self) -> dict:
        return {"pending": [doc.tolist() for doc in self.docs.values()]}


class _Producer(threading.Thread):
    """Reads and tokenizes document batches ahead of the training loop.

    tiktoken releases the GIL while encoding, so this overlaps with the step.
    Errors are handed to the consumer instead of dying silently in the thread.
    """

    def __init__(self, tokenizer, docs: Iterator, prepare: Callable, depth: int = 4, num_threads: int = 4):
        super().__init__(daemon=True, name="tokenizer-producer")
        self.tokenizer, self.docs, self.prepare, self.num_threads = tokenizer, docs, prepare, num_threads
        self.out: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()

    def run(self) -> None:
        bos = self.tokenizer.get_bos_token_id()
        try:
            for texts, position in self.docs:
                ids = self.tokenizer.encode(texts, prepend=bos, num_threads=self.num_threads)
                if not self._put((self.prepare(ids), position)):
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


def _held_from_state(state: dict, packing: str):
    """What the packer held back when `state` was saved; checkpoints from before 2026-12 are concat."""
    saved = state.get("packing", "concat")
    if saved != packing:
        raise DataStateError(
            f"the saved data state was packed {saved!r} but this loader packs {packing!r}: its held-back "
            f"tokens cannot be repacked exactly. Resume with packing {saved!r}, or start the run afresh."
        )
    return state["pending"] if packing == "best-fit" else state["buffer"]


class PretrainLoader:
    """Iterator of (inputs, targets) of shape (B, T) on `device`, for one rank.

    `packing` is one of PACKINGS; `buffer_docs` is best-fit's pool of pending
    documents. `state` (from `state_dict()`) resumes exactly; `loop` repeats
    the split forever (training) or stops at its end (evaluation), dropping
    the last rows that do not fill a whole batch.
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
        packing: str = DEFAULT_PACKING,
        buffer_docs: int = BEST_FIT_BUFFER_DOCS,
    ):
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {', '.join(PACKINGS)}; got {packing!r}")
        self.rows, self.packing = batch_size, packing
        self.device = torch.device(device)
        held = _held_from_state(state, packing) if state else None
        self.packer = (_BestFit(seq_len + 1, buffer_docs, held) if packing == "best-fit"
                       else _Concat(seq_len + 1, held))
        start = DataPosition.from_dict(state["position"]) if state else None
        self.position = start or DataPosition()
        docs = iter_document_batches(
            split, directory=directory, rank=rank, world_size=world_size, start=start, batch_size=docs_per_batch, loop=loop
        )
        self.producer = _Producer(tokenizer, docs, self.packer.prepare)
        self.producer.start()
        self.exhausted = False

    def state_dict(self) -> dict:
        """Where the next batch will come from: the packing, the position after the last absorbed
        document batch, and the tokens (concat) or documents (best-fit) held back."""
        return {"packing": self.packing, "position": self.position.to_dict(), **self.packer.held()}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.packer.take(self.rows, self._absorb_next)
        if block is None:
            raise StopIteration
        rows = torch.from_numpy(block)
        if self.device.type == "cuda":
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        else:
            rows = rows.to(self.device)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _absorb_next(self) -> bool:
        """Hand the packer the next document batch; False once the split has ended."""
        if self.exhausted:
            return False
        item = self.producer.out.get()
        if item is _DONE:
            self.exhausted = True
            return False
        if isinstance(item, BaseException):
            self.close()
            raise item
        prepared, self.position = item
        self.packer.absorb(prepared)
        return True

    def close(self) -> None:
        """Stop the background thread (it may be blocked on a full queue)."""
        self.producer.stopping.set()
        self.producer.join(timeout=5)

    def __del__(self):
        producer = getattr(self, "producer", None)
        if producer is not None:
            producer.stopping.set()


# ---------------------------------------------------------------- what packing costs


@dataclass(frozen=True)
class PackingStats:
    """What each packing does to one pass over `documents` documents of `tokens` tokens in rows of seq_len+1.

    best-fit drops the cropped tail of a document; concat drops nothing but
    trains the tokens after a row boundary without their document's start in
    view, which is the context best-fit gives up by cropping.
    """

    seq_len: int
    documents: int
    tokens: int
    best_fit_rows: int
    best_fit_cropped_docs: int
    best_fit_cropped_tokens: int
    overhang_tokens: int  # beyond a row in documents longer than one: what any row-aligned packing must crop
    concat_docs_mid_row: int  # documents whose <|bos|> is not a row's first token
    concat_docs_split: int  # documents that run on into the next row
    concat_tokens_cut_off: int  # tokens in a later row than their document's start

    def lines(self) -> list[str]:
        docs, toks = self.documents, self.tokens
        return [
            f"seq len {self.seq_len}: {docs:,} documents, {toks:,} tokens (mean {toks / docs:,.0f} per document)",
            f"  best-fit: {self.best_fit_cropped_tokens / toks:.1%} of tokens cropped, "
            f"{self.best_fit_cropped_docs / docs:.1%} of documents cropped, {self.best_fit_rows:,} rows "
            f"(documents longer than a row force {self.overhang_tokens / toks:.1%})",
            f"  concat:   {self.concat_docs_mid_row / docs:.1%} of documents start mid-row ({self.concat_docs_mid_row:,}), "
            f"{self.concat_docs_split / docs:.1%} run across a row boundary, "
            f"{self.concat_tokens_cut_off / toks:.1%} of tokens train without their document's start",
        ]


def packing_stats(documents: list[np.ndarray], seq_len: int, buffer_docs: int = BEST_FIT_BUFFER_DOCS) -> PackingStats:
    """Pack tokenized `documents` (each starting with <|bos|>) both ways, one pass, and count the losses.

    best-fit packs until its documents run out; the documents of the last,
    unfinished row count as read but not cropped.
    """
    row_len = seq_len + 1
    best_fit = _BestFit(row_len, buffer_docs, None)
    feed = iter(documents)

    def more() -> bool:
        doc = next(feed, None)
        if doc is not None:
            best_fit.absorb([doc])
        return doc is not None

    rows = 0
    while best_fit.take(1, more) is not None:
        rows += 1
    mid_row = split = cut_off = overhang = 0
    start = 0
    for doc in documents:
        first_row_end = (start // row_len + 1) * row_len
        mid_row += start % row_len != 0
        split += start + len(doc) > first_row_end
        cut_off += max(0, start + len(doc) - first_row_end)
        overhang += max(0, len(doc) - row_len)
        start += len(doc)
    return PackingStats(
        seq_len=seq_len, documents=len(documents), tokens=start, best_fit_rows=rows,
        best_fit_cropped_docs=best_fit.cropped_docs, best_fit_cropped_tokens=best_fit.cropped_tokens, overhang_tokens=overhang,
        concat_docs_mid_row=mid_row, concat_docs_split=split, concat_tokens_cut_off=cut_off,
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = FlagParser(prog="python -m nanochat.dataloader",
                   description="What best-fit and concat packing cost on a folder of parquet shards (one pass, one rank).")
    p.add_argument("directory", type=Path, help="folder of shard_XXXXX.parquet files")
    p.add_argument("--seq-len", type=int, nargs="+", default=[2048], help="sequence lengths to pack for (default: 2048)")
    p.add_argument("--split", choices=("train", "val"), default="train", help="which split to read (default: train)")
    p.add_argument("--buffer-docs", type=int, default=BEST_FIT_BUFFER_DOCS, help="best-fit's pending documents (default: %(default)s)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: $NANOCHAT_BASE_DIR/tokenizer)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else get_tokenizer()
    except TokenizerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bos = tokenizer.get_bos_token_id()
    documents = []
    try:
        for texts, _ in iter_document_batches(args.split, directory=args.directory):
            documents += _BestFit.prepare(tokenizer.encode(texts, prepend=bos))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not documents:
        print(f"error: no {args.split} documents in {args.directory}", file=sys.stderr)
        return 1
    print(f"{args.split} split of {args.directory}, best-fit buffer of {args.buffer_docs:,} documents")
    for seq_len in args.seq_len:
        print("\n".join(packing_stats(documents, seq_len, args.buffer_docs).lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
