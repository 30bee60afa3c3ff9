"""The pretraining corpus: parquet shards with one `text` column.

Layout: `$NANOCHAT_BASE_DIR/base_data/shard_XXXXX.parquet`. The highest-numbered
shard is the validation split, every other shard is training data. FineWeb-EDU
shards come from `karpathy/fineweb-edu-100b-shuffle` (shard_00000 .. shard_01822);
`-n N` fetches the first N plus the dataset's last shard, so the validation
split stays the same however many training shards arrive later.

Readers walk row groups: rank r of a world of size w reads row groups
r, r+w, r+2w, ... of every shard, so ranks see disjoint data that together
covers everything. Every batch comes with the `DataPosition` just after it,
which a checkpoint stores to resume exactly there.

CLI:  python -m nanochat.dataset -n 8           (download)
      python -m nanochat.dataset --from ~/texts  (import your own corpus)
Exit codes: 0 done, 1 some shards failed (run again: finished ones are kept),
2 a corpus that cannot be imported, 3 the server cannot be reached (offline).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import setup_logging
from nanochat.corpus import CorpusError, import_corpus
from nanochat.download import DownloadError, Unreachable, check_reachable, download_file
from nanochat.shards import data_dir, list_shards, shard_name, split_shards  # noqa: F401 (the readers' layout, re-exported)

log = logging.getLogger("nanochat.dataset")

DEFAULT_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
LAST_SHARD = 1822
OFFLINE_HINT = ("No network? Pretrain on your own text files instead (.txt/.jsonl/.parquet, a file or a folder):\n"
                "  ./speedrun.sh --tiny --data PATH    (or: ./prepare.sh --from PATH)")


@dataclass(frozen=True)
class DataPosition:
    """Where a reader stands: the next row to read is `row` of `row_group` of shard number `shard`."""

    epoch: int = 0
    shard: int = -1  # -1: before the first shard
    row_group: int = 0
    row: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(**{k: int(d[k]) for k in ("epoch", "shard", "row_group", "row")})


def iter_document_batches(
    split: str,
    *,
    directory: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    start: DataPosition | None = None,
    batch_size: int | None = None,
    loop: bool = False,
) -> Iterator[tuple[list[str], DataPosition]]:
    """Yield (documents, position after them) for this rank's stride of `split`.

    `batch_size` caps documents per batch (default: the rest of a row group).
    `loop` starts a new epoch after the last shard instead of stopping. The
    shard list is re-read at every shard boundary, so shards that finish
    downloading while training runs are picked up in order.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    pos = start or DataPosition()
    while True:
        yielded_this_epoch = pos.shard >= 0
        for number, path in _shards_from(split, directory, pos.shard):
            first_rg = pos.row_group if number == pos.shard else rank
            first_row = pos.row if number == pos.shard else 0
            for docs, rg, row in _read_shard(path, first_rg, first_row, world_size, batch_size):
                yielded_this_epoch = True
                yield docs, DataPosition(pos.epoch, number, rg, row)
        if not loop:
            return
        if not yielded_this_epoch:
            raise RuntimeError(
                f"rank {rank} of {world_size} found no {split} data: the shards have fewer row groups "
                "than there are ranks. Re-import the corpus with smaller row groups or use fewer ranks."
            )
        pos = DataPosition(pos.epoch + 1, -1, rank, 0)


def _shards_from(split: str, directory: Path | None, after: int) -> Iterator[tuple[int, Path]]:
    """Shards numbered >= `after`, in order, listing the folder afresh each time."""
    current = after
    while True:
        later = [(n, p) for n, p in split_shards(split, directory).items() if n >= current]
        if not later:
            return
        number, path = later[0]
        yield number, path
        current = number + 1


def _read_shard(path: Path, first_rg: int, first_row: int, step: int, batch_size: int | None):
    """Yield (docs, row_group, next_row) for row groups first_rg, first_rg+step, ..."""
    pf = pq.ParquetFile(path)
    for rg in range(first_rg, pf.num_row_groups, step):
        texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
        row = first_row if rg == first_rg else 0
        size = batch_size or len(texts)
        while row < len(texts):
            batch = texts[row : row + size]
            row += len(batch)
            yield batch, rg, row


def iter_documents(split: str, directory: Path | None = None, **kwargs) -> Iterator[str]:
    """Documents of `split` one at a time (a convenience over iter_document_batches)."""
    for docs, _ in iter_document_batches(split, directory=directory, **kwargs):
        yield from docs


# ---------------------------------------------------------------- downloading


def validate_shard(path: Path) -> None:
    """Raise unless `path` is a readable parquet file with a `text` column."""
    meta = pq.ParquetFile(path)
    if "text" not in meta.schema_arrow.names:
        raise ValueError(f"{path.name} has no 'text' column (columns: {meta.schema_arrow.names})")


def shards_to_fetch(num_train: int, last_shard: int) -> list[int]:
    """The first `num_train` shards plus the validation shard, without duplicates."""
    if num_train < 1:
        raise ValueError("the number of shards must be at least 1")
    train = list(range(min(num_train, last_shard)))
    return train + [last_shard]


def download_shards(
    indices: list[int], *, base_url: str, directory: Path, workers: int = 4, retries: int = 5, backoff: float = 2.0
) -> list[int]:
    """Fetch shards in parallel, skipping those present; return the indices that failed.

    Raises Unreachable, before fetching anything, when the server cannot be reached at all.
    """
    directory.mkdir(parents=True, exist_ok=True)
    present = list_shards(directory)
    todo = [i for i in indices if i not in present]
    if todo:
        check_reachable(base_url)  # offline: say so now, not after every shard's retries
    log.info("%d shard(s) wanted, %d already present, fetching %d into %s", len(indices), len(indices) - len(todo), len(todo), directory)
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(total=len(todo), unit="shard", desc="download") as bar:
        futures = {
            pool.submit(
                download_file, f"{base_url.rstrip('/')}/{shard_name(i)}", directory / shard_name(i),
                retries=retries, backoff=backoff, validate=validate_shard,
            ): i
            for i in todo
        }
        for fut in as_completed(futures):
            try:
                fut.result()
            except DownloadError as exc:
                failed.append(futures[fut])
                tqdm.write(f"FAILED {shard_name(futures[fut])}: {exc}")
            bar.update(1)
    return sorted(failed)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nanochat.dataset",
        description="Download FineWeb-EDU shards, or import your own corpus, into the pretraining shard folder.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-n", "--num-shards", type=int, help="download the first N training shards (plus the validation shard); -1 for all")
    src.add_argument("--from", dest="source", type=Path, help="import a file or folder of .txt / .jsonl (field 'text') / .parquet instead")
    p.add_argument("--data-dir", type=Path, default=None, help="shard folder (default: $NANOCHAT_BASE_DIR/base_data)")
    g = p.add_argument_group("download")
    g.add_argument("--url", default=os.environ.get("NANOCHAT_DATA_URL", DEFAULT_URL), help="base URL holding shard_XXXXX.parquet (env NANOCHAT_DATA_URL; http(s):// or file://)")
    g.add_argument("--last-shard", type=int, default=LAST_SHARD, help="index of the dataset's last shard, used as validation (default %(default)s)")
    g.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads (default %(default)s)")
    g.add_argument("--retries", type=int, default=5, help="attempts per shard before giving up (default %(default)s)")
    g.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubling each time (default %(default)s)")
    c = p.add_argument_group("import (--from)")
    c.add_argument("--shard-chars", type=int, default=250_000_000, help="characters per output shard (default %(default)s)")
    c.add_argument("--max-doc-chars", type=int, default=20_000, help="split longer documents at paragraph breaks (default %(default)s)")
    c.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation (default %(default)s)")
    c.add_argument("--overwrite", action="store_true", help="replace shards already in the folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = _parse_args(argv)
    directory = args.data_dir or data_dir()
    if args.source is not None:
        try:
            stats = import_corpus(
                args.source, directory, shard_chars=args.shard_chars, max_doc_chars=args.max_doc_chars,
                val_fraction=args.val_fraction, overwrite=args.overwrite,
            )
        except CorpusError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"imported {stats}")
        return 0
    last = args.last_shard
    count = last if args.num_shards == -1 else args.num_shards
    try:
        failed = download_shards(
            shards_to_fetch(count, last), base_url=args.url, directory=directory,
            workers=args.workers, retries=args.retries, backoff=args.backoff,
        )
    except Unreachable as exc:
        print(f"error: {exc} (shards from {args.url})\n{OFFLINE_HINT}", file=sys.stderr)
        return 3
    if failed:
        print(f"error: {len(failed)} shard(s) failed: {', '.join(shard_name(i) for i in failed)}; run again to retry (finished shards are kept)", file=sys.stderr)
        return 1
    print(f"all shards present in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
