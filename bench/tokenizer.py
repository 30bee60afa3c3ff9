"""Benchmark: tokenizer training time and encode throughput.

    python bench/tokenizer.py                                   # generated corpus
    python bench/tokenizer.py --data-dir /path/to/shards --vocab-size 8192

With --data-dir, the tokenizer trains on the train split and encodes the
validation split (the last shard). Without it, both come from a generated
corpus of made-up English-like words, so the benchmark needs no download.
Encode throughput is UTF-8 megabytes of input per second, best of --repeats.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

if __package__ in (None, ""):
    # run as a file: make the repo root importable even without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.dataset import iter_documents  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402

ONSETS = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "w", "th", "st", "br", "ch", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "y"]
CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "ck"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark tokenizer training and encoding speed.")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder of parquet shards with a `text` column (default: a generated corpus)",
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size to train (default: 8192)")
    parser.add_argument("--train-chars", type=float, default=2e7, help="characters of training text (default: 2e7)")
    parser.add_argument("--encode-chars", type=float, default=5e6, help="characters of text to encode (default: 5e6)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="threads for batched encoding (default: all cores)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="time each encode this many times and keep the best (default: 3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated corpus (default: 0)")
    return parser.parse_args(argv)


def made_up_lexicon(rng: random.Random, size: int) -> list[str]:
    words = set()
    while len(words) < size:
        syllables = rng.choices([1, 2, 3, 4], weights=[4, 4, 2, 1])[0]
        words.add("".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)))
    # shortest first: rank 1 gets the highest Zipf weight, and in real text the commonest words are short
    return sorted(words, key=lambda word: (len(word), word))


def generated_documents(seed: int, lexicon_size: int = 20_000) -> Iterable[str]:
    """Endless documents of sentences whose words follow a Zipf-like law, like real prose."""
    rng = random.Random(seed)
    lexicon = made_up_lexicon(rng, lexicon_size)
    # cumulative weights computed once: rng.choices would redo the sum per sentence
    cum_weights = list(itertools.accumulate(1 / rank for rank in range(1, lexicon_size + 1)))
    while True:
        sentences = []
        for _ in range(rng.randint(20, 120)):
            words = rng.choices(lexicon, cum_weights=cum_weights, k=rng.randint(4, 24))
            if rng.random() < 0.15:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 3000)))
            sentences.append(" ".join(words).capitalize() + rng.choice(".....?!"))
        yield " ".join(sentences)


def take_chars(documents: Iterable[str], budget: int) -> list[str]:
    """Whole documents until `budget` characters are reached (the last one cut to fit)."""
    taken = []
    for document in documents:
        taken.append(document[:budget])
        budget -= len(taken[-1])
        if budget <= 0:
            break
    return taken


def corpus(args: argparse.Namespace) -> tuple[str, list[str], list[str]]:
    """(description, training texts, texts to encode)."""
    if args.data_dir is None:
        train = take_chars(generated_documents(args.seed), int(args.train_chars))
        held_out = take_chars(generated_documents(args.seed + 1), int(args.encode_chars))
        return f"generated (seed {args.seed})", train, held_out
    train = take_chars(iter_documents("train", args.data_dir), int(args.train_chars))
    held_out = take_chars(iter_documents("val", args.data_dir), int(args.encode_chars))
    return str(args.data_dir), train, held_out


def best_time(fn: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - started)
    return min(timings)


def run(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(metric, value) rows of the results table."""
    name, train, held_out = corpus(args)
    train_chars = sum(map(len, train))
    started = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(train, args.vocab_size)
    train_seconds = time.perf_counter() - started
    megabytes = sum(len(text.encode("utf-8")) for text in held_out) / 1e6
    single = best_time(lambda: [tokenizer.encode(text) for text in held_out], args.repeats)
    batched = best_time(lambda: tokenizer.encode(held_out, num_threads=args.threads), args.repeats)
    tokens = sum(map(len, tokenizer.encode(held_out, num_threads=args.threads)))
    return [
        ("corpus", name),
        ("cpu cores", str(os.cpu_count())),
        ("training text", f"{train_chars / 1e6:.1f} M chars in {len(train):,} docs"),
        ("vocab size", f"{tokenizer.get_vocab_size():,}"),
        ("training time", f"{train_seconds:.2f} s ({train_chars / 1e6 / train_seconds:.1f} M chars/s)"),
        ("encoded text", f"{megabytes:.1f} MB in {len(held_out):,} docs"),
        ("encode, 1 thread", f"{megabytes / single:.1f} MB/s"),
        (f"encode, batch of {len(held_out):,} docs, {args.threads} threads", f"{megabytes / batched:.1f} MB/s"),
        ("compression", f"{megabytes * 1e6 / tokens:.2f} bytes/token"),
    ]


def print_table(rows: list[tuple[str, str]]) -> None:
    """A markdown table, so results paste straight into docs."""
    width = max(len(metric) for metric, _ in rows)
    value_width = max(len(value) for _, value in rows)
    print(f"| {'metric':<{width}} | {'value':<{value_width}} |")
    print(f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|")
    for metric, value in rows:
        print(f"| {metric:<{width}} | {value:<{value_width}} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
