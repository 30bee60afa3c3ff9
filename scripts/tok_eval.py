"""Compression of the trained tokenizer on the validation split, beside GPT-2's and GPT-4's.

    python -m scripts.tok_eval
    python -m scripts.tok_eval --max-docs 500 --data-dir /path/to/shards

More bytes per token means shorter sequences for the same text. The GPT-2
(gpt2) and GPT-4 (cl100k_base) encodings are fetched by tiktoken on first
use; offline, and not already cached, they are skipped.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from nanochat.dataset import iter_documents
from nanochat.flags import FlagParser
from nanochat.tokenizer import TokenizerError, get_tokenizer

BASELINES = {"gpt2": "GPT-2", "cl100k_base": "GPT-4"}


@dataclass(frozen=True)
class Compression:
    name: str
    vocab_size: int
    tokens: int
    bytes: int
    chars: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = FlagParser(description="Report tokenizer compression (bytes/token) on the validation split.")
    parser.add_argument(
        "--max-docs", type=int, default=2000, help="evaluate on at most this many validation documents (default: 2000)"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="folder of parquet shards (default: the folder of the dataset prepare.sh fetched last)"
    )
    return parser.parse_args(argv)


def measure(name: str, vocab_size: int, token_counts: list[int], docs: list[str]) -> Compression:
    return Compression(
        name=name,
        vocab_size=vocab_size,
        tokens=sum(token_counts),
        bytes=sum(len(doc.encode("utf-8")) for doc in docs),
        chars=sum(len(doc) for doc in docs),
    )


def baseline_rows(docs: list[str]) -> list[Compression]:
    """Rows for the tiktoken baselines that can be loaded; a note for each that cannot."""
    rows = []
    for encoding_name, label in BASELINES.items():
        try:
            encoding = tiktoken.get_encoding(encoding_name)
        except Exception as err:  # network errors come in many types; a missing baseline is not fatal
            print(f"{encoding_name} ({label}): unavailable offline, skipped ({type(err).__name__})")
            continue
        counts = [len(ids) for ids in encoding.encode_ordinary_batch(docs)]
        rows.append(measure(f"{encoding_name} ({label})", encoding.n_vocab, counts, docs))
    return rows


def print_table(rows: list[Compression]) -> None:
    ours = rows[0]
    print(
        f"{'tokenizer':<20} {'vocab':>9} {'tokens':>12} {'bytes/token':>12} {'chars/token':>12} {'tokens vs ours':>15}"
    )
    for row in rows:
        relative = f"{(row.tokens / ours.tokens - 1) * 100:+.1f}%" if row is not ours else "-"
        print(
            f"{row.name:<20} {row.vocab_size:>9,} {row.tokens:>12,} "
            f"{row.bytes / row.tokens:>12.3f} {row.chars / row.tokens:>12.3f} {relative:>15}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tokenizer = get_tokenizer()
        docs = list(itertools.islice(iter_documents("val", args.data_dir), args.max_docs))
    except (TokenizerError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not any(docs):
        print("error: the validation split holds no text", file=sys.stderr)
        return 1
    counts = [len(ids) for ids in tokenizer.encode(docs)]
    ours = measure("ours", tokenizer.get_vocab_size(), counts, docs)
    print(f"validation documents: {len(docs):,} ({ours.chars:,} characters, {ours.bytes:,} bytes)")
    print_table([ours] + baseline_rows(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
