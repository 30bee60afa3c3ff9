"""Where a dataset split's rows come from: a local path, or the Hugging Face Hub, both through
`datasets.load_dataset`.

In order: the `path=` a task was given, then the task-data folder
($NANOCHAT_TASK_DATA) when it holds a file or folder under the split's
conventional name (`local_name`: e.g. gsm8k-main-test.jsonl, arc-ARC-Easy-train.parquet,
smoltalk-train/ with files inside), then the Hub. A folder without that name
falls through to the Hub, so it may hold only the datasets you replace.

- A local path is one file or a folder of files in one format: .parquet, or
  .jsonl / .json (JSON lines, or one array of objects), read in name order by
  load_dataset("parquet" | "json", data_files=...).
- The Hub: load_dataset(repo, subset, split=split), with the usual HF token for
  gated datasets (`hf auth login`, or HF_TOKEN).

Both are cached by `datasets` under $NANOCHAT_BASE_DIR/datasets; once a split is
there, no network is needed. Offline mode (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1)
reads only that cache; a Hub that cannot be reached (probed in seconds, where the
library would retry for half a minute) is treated the same way, so a cached split
still loads and a missing one fails with a message saying how to use local files.

`datasets` is imported when a split is loaded: it takes seconds, which entry points
that never load a dataset should not pay.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from nanochat.common import DataError, get_base_dir
from nanochat.download import Unreachable, check_reachable
from tasks.base import Task, TaskDataError

JSON_SUFFIXES = (".jsonl", ".json")
SUFFIXES = (".parquet", *JSON_SUFFIXES)
TASK_DATA_ENV = "NANOCHAT_TASK_DATA"


def task_data_dir() -> Path | None:
    """The folder $NANOCHAT_TASK_DATA names, or None when it is unset; a folder that is not there is an error."""
    chosen = os.environ.get(TASK_DATA_ENV)
    if not chosen:
        return None
    folder = Path(chosen).expanduser()
    if not folder.is_dir():
        raise TaskDataError(f"{folder} (from ${TASK_DATA_ENV}) is not a folder; "
                            f"python -m tasks.sample_data {folder} writes one with generated files")
    return folder


def task_data_file(name: str) -> Path | None:
    """The task-data folder's entry `name` (with or without one of SUFFIXES), or None when absent or no folder is set."""
    folder = task_data_dir()
    if folder is None:
        return None
    found = [p for p in (folder / name, *(folder / (name + s) for s in SUFFIXES)) if p.exists()]
    if len(found) > 1:
        raise TaskDataError(f"{folder}: both {found[0].name} and {found[1].name} could be {name!r}; keep one")
    return found[0] if found else None


class HubUnavailable(DataError, RuntimeError):
    """A split could not be fetched from the Hub; the message says how to use a local copy."""


@dataclass(frozen=True)
class HubDataset:
    """One split of one subset (config) of a Hub dataset, and its name in the task-data folder."""

    repo: str
    subset: str
    split: str
    local_name: str  # a HubTask's local_name with subset and split filled in

    def describe(self) -> str:
        return f"{self.repo} (subset {self.subset!r}, split {self.split!r})"


class Rows:
    """The rows of one split as dicts, and where each came from, for error messages."""

    def __init__(self, table, source: str):
        self.table, self.source = table, source  # a datasets.Dataset, and the file, folder or Hub split

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} rows)")
        return self.table[index]

    def where(self, index: int) -> str:
        return f"{self.source} row {index} (counting from 0)"


def open_rows(dataset: HubDataset, path: str | Path | None = None) -> Rows:
    """The split's rows: from `path`, else from the task-data folder, else from the Hub (cached)."""
    if path is not None:
        return load_local(Path(path))
    local = task_data_file(dataset.local_name)
    return load_local(local) if local is not None else load_from_hub(dataset)


def cache_dir() -> Path:
    return get_base_dir() / "datasets"


def data_files(path: Path) -> list[Path]:
    """`path` itself if it is a data file, else the data files directly inside the folder, all of one format."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise TaskDataError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise TaskDataError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise TaskDataError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
    if len({f.suffix == ".parquet" for f in files}) > 1:
        raise TaskDataError(f"{path}: folder mixes parquet and JSON files; keep one format per folder")
    return files


def load_local(path: Path) -> Rows:
    """A local file or folder, through load_dataset's parquet or json builder; TaskDataError if unreadable."""
    import datasets

    files = data_files(path)
    parquet = files[0].suffix == ".parquet"
    empty = [f for f in files if f.stat().st_size == 0]
    if empty:  # the json builder fails on these with a bare StopIteration
        raise TaskDataError(f"{empty[0]}: the file is empty")
    try:
        table = datasets.load_dataset("parquet" if parquet else "json", data_files=[str(f) for f in files],
                                      split="train", cache_dir=str(cache_dir()))
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, OSError, ValueError) as exc:
        cause = exc.__cause__ or exc  # DatasetGenerationError wraps the reader's own complaint
        kind = "parquet" if parquet else "JSON lines or a JSON array of objects"
        raise TaskDataError(f"{path}: not readable as {kind} ({cause})") from None
    return Rows(table, str(path))


def load_from_hub(dataset: HubDataset) -> Rows:
    """The split from the Hub, cached; from the cache only when offline or the Hub is unreachable."""
    import datasets

    offline = "offline mode is on (HF_HUB_OFFLINE)" if datasets.config.HF_HUB_OFFLINE else None
    if offline is None:
        try:
            check_reachable(datasets.config.HF_ENDPOINT)
        except Unreachable as exc:
            offline = str(exc)
    try:
        with _cache_only(offline is not None):
            table = datasets.load_dataset(dataset.repo, dataset.subset, split=dataset.split, cache_dir=str(cache_dir()))
    except OSError as exc:  # ConnectionError, not cached, DatasetNotFoundError (gated, or no such split)
        where = f"{offline} and it is not in the cache ({cache_dir()})" if offline else exc
        raise HubUnavailable(
            f"could not load {dataset.describe()} from the Hugging Face Hub: {where}. "
            f"Gated datasets need a token (hf auth login, or HF_TOKEN). Without network access, save the split "
            f"as parquet, jsonl or json files with the same columns, as {dataset.local_name}.jsonl (or .parquet, "
            f"or a folder of that name) in the folder ${TASK_DATA_ENV} names, or pass path=<file or folder> "
            f"(python -m tasks.sample_data DIR writes generated ones)"
        ) from exc
    return Rows(table, f"{dataset.repo} {dataset.subset}/{dataset.split}")


@contextlib.contextmanager
def _cache_only(on: bool):
    """datasets' offline mode for one call. The library reads it from datasets.config at call time
    (HF_HUB_OFFLINE is read once, at import), so setting it there is how a running process goes offline."""
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or on
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


class HubTask(Task):
    """A task read row by row from one split of a Hub dataset, or from a local file with the same schema."""

    repo = ""
    local_name = ""  # the split's name in the task-data folder; "{subset}" and "{split}" are filled in
    splits: dict[str, tuple[str, ...]] = {}  # subset -> the splits it has

    def __init__(self, subset: str, split: str, path: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        if split not in self.splits.get(subset, ()):
            available = "; ".join(f"subset {s!r}: {', '.join(splits)}" for s, splits in self.splits.items())
            raise ValueError(f"{type(self).__name__} has no subset {subset!r} split {split!r} (available: {available})")
        self.records = open_rows(HubDataset(self.repo, subset, split, self.local_file(subset, split)), path)

    @classmethod
    def local_file(cls, subset: str, split: str) -> str:
        return cls.local_name.format(subset=subset, split=split)

    def num_examples(self) -> int:
        return len(self.records)
