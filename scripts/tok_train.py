"""Train the BPE tokenizer on the pretraining train split and save it.

    python -m scripts.tok_train                      # 65,536 tokens, up to 2e9 chars
    python -m scripts.tok_train --vocab-size 8192 --max-chars 5e7

Writes $NANOCHAT_BASE_DIR/tokenizer/ (see nanochat/tokenizer.py for the files).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from nanochat.dataset import iter_documents
from nanochat.flags import FlagParser
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir


def count(text: str) -> int:
    """Integer from plain or scientific notation, so `--max-chars 2e9` works."""
    value = float(text)
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = FlagParser(description="Train the byte-level BPE tokenizer on the train split.")
    parser.add_argument(
        "--vocab-size",
        type=count,
        default=2**16,
        help="total vocabulary including the 9 special tokens (default: 65536)",
    )
    parser.add_argument(
        "--max-chars",
        type=count,
        default=2_000_000_000,
        help="stop after this many characters of training text (default: 2e9)",
    )
    parser.add_argument(
        "--doc-cap",
        type=count,
        default=10_000,
        help="use at most this many characters of each document (default: 10000)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="folder of parquet shards (default: $NANOCHAT_BASE_DIR/base_data)"
    )
    return parser.parse_args(argv)


def capped_texts(documents: Iterable[str], doc_cap: int, max_chars: int, progress: tqdm) -> Iterator[str]:
    """Each document cut to `doc_cap` chars, the last one cut so the total is at most `max_chars`.

    Capping documents keeps a few huge ones from dominating the merge statistics.
    """
    budget = max_chars
    for document in documents:
        text = document[: min(doc_cap, budget)]
        budget -= len(text)
        progress.update(len(text))
        yield text
        if budget == 0:
            return
    if budget == max_chars:
        raise ValueError("the train split holds no text")


def train(args: argparse.Namespace) -> tuple[Tokenizer, int]:
    """The trained tokenizer and the number of characters it saw."""
    progress = tqdm(total=args.max_chars, unit="char", unit_scale=True, desc="reading text")
    texts = capped_texts(iter_documents("train", args.data_dir), args.doc_cap, args.max_chars, progress)
    try:
        tokenizer = Tokenizer.train_from_iterator(texts, args.vocab_size)
    finally:
        progress.close()
    return tokenizer, progress.n


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        tokenizer, chars_seen = train(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    out_dir = tokenizer.save(default_tokenizer_dir())
    print(f"trained on {chars_seen:,} characters in {elapsed:.1f} s")
    num_special = len(tokenizer.get_special_tokens())
    num_mergeable = tokenizer.get_vocab_size() - num_special
    print(f"vocab size: {tokenizer.get_vocab_size():,} ({num_mergeable:,} mergeable + {num_special} special)")
    print(f"saved to: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
