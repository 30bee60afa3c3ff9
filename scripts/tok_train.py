"""Train the BPE tokenizer on the pretraining train split and save it.

    python -m scripts.tok_train                      # 65,536 tokens, up to 2e9 chars
    python -m scripts.tok_train --vocab-size 8192 --max-chars 5e7
    python -m scripts.tok_train --skip-if-trained    # unless one trained on this data is there (prepare.sh)

Reads the shard folder pretraining reads (nanochat/shards.py: the dataset
prepare.sh fetched last). Writes $NANOCHAT_BASE_DIR/tokenizer/ (see
nanochat/tokenizer.py for the files) and, beside them, `trained_on.json`: the
data folder and the hash of the ranks it produced, so that a tokenizer trained
on another dataset (or replaced by an installed one) is told apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from nanochat.common import get_base_dir
from nanochat.dataset import DEFAULT_FOLDER, DataChoiceError, data_dir, iter_documents
from nanochat.fileio import atomic_write
from nanochat.flags import FlagParser
from nanochat.tokenizer import MANIFEST_FILE, RANKS_FILE, Tokenizer, TokenizerError, default_tokenizer_dir

RECORD_FILE = "trained_on.json"


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
        "--data-dir", type=Path, default=None,
        help="folder of parquet shards (default: the one pretraining reads, $NANOCHAT_BASE_DIR/base_data for FineWeb-EDU)",
    )
    parser.add_argument(
        "--skip-if-trained", action="store_true",
        help="do nothing when the saved tokenizer was trained on this data folder (prepare.sh's default)",
    )
    return parser.parse_args(argv)


def data_label(directory: Path) -> str:
    """The data folder as the record names it: relative to $NANOCHAT_BASE_DIR when inside it, so moving that survives."""
    directory, base = directory.resolve(), get_base_dir().resolve()
    return str(directory.relative_to(base)) if directory.is_relative_to(base) else str(directory)


def _ranks_hash(tokenizer_dir: Path) -> str | None:
    try:
        return json.loads((tokenizer_dir / MANIFEST_FILE).read_text(encoding="utf-8"))["sha256"][RANKS_FILE]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def trained_on(tokenizer_dir: Path) -> str | None:
    """The data folder the saved tokenizer was trained on; None when not recorded or the tokenizer changed since."""
    try:
        record = json.loads((tokenizer_dir / RECORD_FILE).read_text(encoding="utf-8"))
        data, ranks = record["data"], record["ranks_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if ranks == _ranks_hash(tokenizer_dir) else None


def record_training(tokenizer_dir: Path, data: str) -> None:
    record = {"data": data, "ranks_sha256": _ranks_hash(tokenizer_dir)}
    atomic_write(tokenizer_dir / RECORD_FILE, json.dumps(record, indent=2) + "\n")


def saved_tokenizer_source(tokenizer_dir: Path) -> str | None:
    """The data folder a loadable saved tokenizer was trained on; None when there is none. One without a
    record (trained before records were kept, or installed) counts as trained on base_data, where every
    earlier version read."""
    try:
        Tokenizer.load(tokenizer_dir)
    except (TokenizerError, OSError):
        return None
    return trained_on(tokenizer_dir) or DEFAULT_FOLDER


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
    try:
        args.data_dir = args.data_dir or data_dir()
    except DataChoiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    data = data_label(args.data_dir)
    if args.skip_if_trained:
        source = saved_tokenizer_source(default_tokenizer_dir())
        if source == data:
            print(f"tokenizer already trained on {data} in {default_tokenizer_dir()} (./prepare.sh --retrain-tokenizer redoes it)")
            return 0
        if source is not None:
            print(f"the tokenizer in {default_tokenizer_dir()} was trained on {source}: training it again on {data}")
    started = time.perf_counter()
    try:
        tokenizer, chars_seen = train(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    out_dir = tokenizer.save(default_tokenizer_dir())
    record_training(out_dir, data)
    print(f"trained on {chars_seen:,} characters of {data} in {elapsed:.1f} s")
    num_special = len(tokenizer.get_special_tokens())
    num_mergeable = tokenizer.get_vocab_size() - num_special
    print(f"vocab size: {tokenizer.get_vocab_size():,} ({num_mergeable:,} mergeable + {num_special} special)")
    print(f"saved to: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
