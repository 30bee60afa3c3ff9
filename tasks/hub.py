"""Where a dataset split's rows come from: a local path, or the Hugging Face Hub.

In order: the `path=` a task was given, then the dataset family's environment
variable (e.g. NANOCHAT_GSM8K_PATH; "{subset}" and "{split}" in its value are
filled in, so one variable can serve every split), then the Hub. From the Hub
we take the parquet files the dataset viewer converted the split into (their
list comes from its /parquet API), cached under
$NANOCHAT_BASE_DIR/datasets/<owner>__<name>/<subset>/<split>/; once there,
no network is needed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pyarrow.parquet as pq

from nanochat.common import get_base_dir
from nanochat.download import DownloadError, download_file
from tasks.base import Task, TaskDataError
from tasks.records import Records, data_files, read_records

PARQUET_LIST_API = "https://datasets-server.huggingface.co/parquet"
LISTING_FILE = "parquet_files.json"
# Offline should fail in seconds, not minutes: the files themselves are small.
RETRIES = 3
BACKOFF_S = 1.0


class HubUnavailable(RuntimeError):
    """A split could not be fetched from the Hub; the message says how to use a local copy."""


@dataclass(frozen=True)
class HubDataset:
    """One split of one subset (config) of a Hub dataset, and the variable that overrides it."""

    repo: str
    subset: str
    split: str
    env_var: str

    def describe(self) -> str:
        return f"{self.repo} (subset {self.subset!r}, split {self.split!r})"


def open_records(dataset: HubDataset, path: str | Path | None = None) -> Records:
    """The split's rows: from `path`, else from $<env_var>, else from the Hub (cached)."""
    if path is not None:
        return read_records(data_files(Path(path)))
    override = os.environ.get(dataset.env_var)
    if override:
        local = Path(override.replace("{subset}", dataset.subset).replace("{split}", dataset.split))
        if not local.expanduser().exists():
            raise TaskDataError(f"{local} (from ${dataset.env_var}, for {dataset.describe()}) does not exist")
        return read_records(data_files(local))
    return read_records(fetch_parquet_files(dataset))


def cache_dir(dataset: HubDataset) -> Path:
    return get_base_dir() / "datasets" / dataset.repo.replace("/", "__") / dataset.subset / dataset.split


def fetch_parquet_files(dataset: HubDataset) -> list[Path]:
    """The split's parquet files, downloaded on first use; HubUnavailable if that fails."""
    folder = cache_dir(dataset)
    query = urlencode({"dataset": dataset.repo, "config": dataset.subset, "split": dataset.split})
    try:
        listing = download_file(f"{PARQUET_LIST_API}?{query}", folder / LISTING_FILE,
                                retries=RETRIES, backoff=BACKOFF_S, validate=_read_listing)
        return [
            download_file(url, folder / name, retries=RETRIES, backoff=BACKOFF_S, validate=pq.read_metadata)
            for name, url in _read_listing(listing)
        ]
    except DownloadError as exc:
        raise HubUnavailable(
            f"could not fetch {dataset.describe()} from the Hugging Face Hub: {exc}. "
            f"Without network access, copy the split here as parquet, jsonl or json with the same "
            f"columns and pass path=<file or folder> or set {dataset.env_var}=<file or folder>"
        ) from exc


def _read_listing(path: Path) -> list[tuple[str, str]]:
    """(file name, url) of each parquet file in a /parquet API answer; ValueError if it lists none."""
    answer = json.loads(Path(path).read_text(encoding="utf-8"))
    entries = answer.get("parquet_files") if isinstance(answer, dict) else None
    if not entries:
        raise ValueError(f"the Hub lists no parquet files for this split: {str(answer)[:200]}")
    files = []
    for entry in entries:
        name, url = entry.get("filename"), entry.get("url")
        # the name becomes a path on disk, so it must be a plain file name
        if not (isinstance(name, str) and isinstance(url, str) and name.endswith(".parquet") and Path(name).name == name):
            raise ValueError(f"unexpected entry in the parquet file list: {entry!r}")
        files.append((name, url))
    return files


class HubTask(Task):
    """A task read row by row from one split of a Hub dataset, or from a local file with the same schema."""

    repo = ""
    env_var = ""
    splits: dict[str, tuple[str, ...]] = {}  # subset -> the splits it has

    def __init__(self, subset: str, split: str, path: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        if split not in self.splits.get(subset, ()):
            available = "; ".join(f"subset {s!r}: {', '.join(splits)}" for s, splits in self.splits.items())
            raise ValueError(f"{type(self).__name__} has no subset {subset!r} split {split!r} (available: {available})")
        self.records = open_records(HubDataset(self.repo, subset, split, self.env_var), path)

    def num_examples(self) -> int:
        return len(self.records)

