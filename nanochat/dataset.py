"""The pretraining corpus: parquet shards with one `text` column, downloaded or imported, and read in order.

Layout (nanochat/shards.py): `$NANOCHAT_BASE_DIR/<folder>/shard_XXXXX.parquet`.
The highest-numbered shard is the validation split, every other shard is
training data. `DATASETS` is the registry of corpora to download: FineWeb-EDU
(the default, into `base_data`) and ClimbMix (into `base_data_climbmix`).
`-n N` fetches the first N shards plus the dataset's last one, so the validation
split stays the same however many training shards arrive later.

Downloading or importing into a dataset's own folder makes it the folder the
readers use (tokenizer training, pretraining, evaluation), and a later download
without `--dataset` continues that dataset: `./prepare.sh --dataset climbmix`
once, then `./pretrain.sh` as always. Imported corpora go to `base_data`.

Readers walk row groups: rank r of a world of size w reads row groups
r, r+w, r+2w, ... of every shard, so ranks see disjoint data that together
covers everything. Every batch comes with the `DataPosition` just after it,
which a checkpoint stores to resume exactly there.

CLI:  python -m nanochat.dataset -n 8                       (download FineWeb-EDU)
      python -m nanochat.dataset -n 8 --dataset climbmix    (download ClimbMix)
      python -m nanochat.dataset --from ~/texts              (import your own corpus)
      python -m nanochat.dataset --which                     (the dataset the readers use)
Exit codes: 0 done, 1 some shards failed (run again: finished ones are kept),
2 bad arguments (an unknown dataset) or a corpus that cannot be imported,
3 the server cannot be reached (offline).
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
from nanochat.shards import (  # noqa: F401 (data_dir, split_shards: the readers' layout, re-exported)
    DEFAULT_FOLDER, DataChoiceError, choose_folder, data_dir, list_shards, shard_name, split_shards,
)

log = logging.getLogger("nanochat.dataset")


@dataclass(frozen=True)
class Dataset:
    """A corpus to download: shards 0..`last_shard` at `url`/`remote_name`.format(i), kept in `folder`."""

    name: str
    url: str
    last_shard: int  # the validation split
    folder: str  # under $NANOCHAT_BASE_DIR
    remote_name: str = "shard_{:05d}.parquet"  # the file name on the server; locally it is always shards.shard_name


DATASETS = {d.name: d for d in (
    Dataset("fineweb-edu", "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
            last_shard=1822, folder=DEFAULT_FOLDER),
    # karpathy/nanochat switched to it in 2026: its dataset.py names the shards shard_00000 .. shard_06542 and
    # keeps them in base_data_climbmix. 400B tokens over 6,543 shards is about 61M tokens a shard, close to a
    # FineWeb-EDU shard, so prepare.sh's shard counts carry over (an estimate, not measured here).
    Dataset("climbmix", "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
            last_shard=6542, folder="base_data_climbmix"),
)}
DEFAULT_DATASET = "fineweb-edu"
URL_ENV = "NANOCHAT_DATA_URL"
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


def chosen_dataset() -> Dataset:
    """The dataset whose folder the readers use now: the last one downloaded, FineWeb-EDU before any."""
    folder = data_dir().name
    for dataset in DATASETS.values():
        if dataset.folder == folder:
            return dataset
    raise DataChoiceError(f"the readers use {data_dir()}, the folder of no dataset; pass --dataset ({', '.join(DATASETS)})")


def download_shards(
    indices: list[int], *, base_url: str, directory: Path, workers: int = 4, retries: int = 5, backoff: float = 2.0,
    remote_name: str = Dataset.remote_name,
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
                download_file, f"{base_url.rstrip('/')}/{remote_name.format(i)}", directory / shard_name(i),
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
        description="Download a pretraining dataset's shards, or import your own corpus, into its shard folder.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-n", "--num-shards", type=int, help="download the first N training shards (plus the validation shard); -1 for all")
    src.add_argument("--from", dest="source", type=Path, help="import a file or folder of .txt / .jsonl (field 'text') / .parquet instead")
    src.add_argument("--which", action="store_true", help="print the name of the dataset the tokenizer and pretraining read now")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="shard folder (default: the dataset's own under $NANOCHAT_BASE_DIR, which then becomes the one pretraining reads)")
    g = p.add_argument_group("download")
    g.add_argument("--dataset", choices=list(DATASETS), default=None,
                   help=f"which dataset (default: the one downloaded last in this $NANOCHAT_BASE_DIR, {DEFAULT_DATASET} before any)")
    g.add_argument("--url", default=None, help=f"base URL holding the dataset's shards (default: env {URL_ENV}, else the dataset's; http(s):// or file://)")
    g.add_argument("--last-shard", type=int, default=None, help="index of the dataset's last shard, used as validation (default: the dataset's)")
    g.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads (default %(default)s)")
    g.add_argument("--retries", type=int, default=5, help="attempts per shard before giving up (default %(default)s)")
    g.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubling each time (default %(default)s)")
    c = p.add_argument_group("import (--from)")
    c.add_argument("--shard-chars", type=int, default=250_000_000, help="characters per output shard (default %(default)s)")
    c.add_argument("--max-doc-chars", type=int, default=20_000, help="split longer documents at paragraph breaks (default %(default)s)")
    c.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation (default %(default)s)")
    c.add_argument("--overwrite", action="store_true", help="replace shards already in the folder")
    c.add_argument("--keep-existing", action="store_true", help="when the folder already holds shards, keep them and succeed (prepare.sh)")
    args = p.parse_args(argv)
    if args.source is not None and args.dataset is not None:
        p.error("--dataset names a dataset to download; --from imports your own corpus instead (into base_data)")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = _parse_args(argv)
    try:
        if args.which:
            print(chosen_dataset().name)
            return 0
        if args.source is not None:
            return _import(args.source, args.data_dir, args.keep_existing, shard_chars=args.shard_chars,
                           max_doc_chars=args.max_doc_chars, val_fraction=args.val_fraction, overwrite=args.overwrite)
        return _download(args.dataset, args.url, args.last_shard, args.num_shards, args.data_dir,
                         workers=args.workers, retries=args.retries, backoff=args.backoff)
    except DataChoiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _import(source: str, data_dir: str | None, keep_existing: bool, **options) -> int:
    """Import `source` into shards (import_corpus's options); the exit code."""
    directory = data_dir or choose_folder(DEFAULT_FOLDER)
    if keep_existing and list_shards(directory):
        print(f"shards already present in {directory}; keeping them (remove the folder to re-import)")
        return 0
    try:
        stats = import_corpus(source, directory, **options)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"imported {stats} into {directory}")
    return 0


def _download(name: str | None, url: str | None, last_shard: int | None, num_shards: int, data_dir: str | None,
              **fetching) -> int:
    """Download the named (else the chosen) dataset's shards (download_shards' workers, retries, backoff); the exit code."""
    dataset = DATASETS[name] if name else chosen_dataset()
    url = url or os.environ.get(URL_ENV) or dataset.url
    last = dataset.last_shard if last_shard is None else last_shard
    # chosen before fetching, not after: prepare.sh's background download ends hours later, and must not
    # switch the readers back if another dataset was chosen meanwhile
    directory = data_dir or choose_folder(dataset.folder)
    count = last if num_shards == -1 else num_shards
    try:
        failed = download_shards(
            shards_to_fetch(count, last), base_url=url, directory=directory,
            remote_name=dataset.remote_name, **fetching,
        )
    except Unreachable as exc:
        print(f"error: {exc} (shards from {url})\n{OFFLINE_HINT}", file=sys.stderr)
        return 3
    if failed:
        print(f"error: {len(failed)} shard(s) failed: {', '.join(shard_name(i) for i in failed)}; run again to retry (finished shards are kept)", file=sys.stderr)
        return 1
    print(f"all {dataset.name} shards present in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
