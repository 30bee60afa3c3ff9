"""The pretraining shard folders' layout, which the downloader, the corpus importer and the readers share.

`$NANOCHAT_BASE_DIR/<folder>/shard_XXXXX.parquet` (five digits); a `.part`
file is a shard still being written and does not count. The highest-numbered
shard is the validation split, every other one is training data.

Each downloadable dataset has its own folder (`base_data` for FineWeb-EDU and
imported corpora, `base_data_climbmix` for ClimbMix; the registry is in
nanochat/dataset.py). `$NANOCHAT_BASE_DIR/pretraining_folder.txt` names the
one the readers use, so that the tokenizer, pretraining and the loss evaluation
all read what the last download or import fetched without being told again.
Without that file they read `base_data`, where every earlier version put its shards.
"""

from __future__ import annotations

import re
from pathlib import Path

from nanochat.common import get_base_dir
from nanochat.fileio import atomic_write

SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")
SPLITS = ("train", "val")
DEFAULT_FOLDER = "base_data"
CHOICE_FILE = "pretraining_folder.txt"
# one path component: the choice can only point inside the base dir
FOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class DataChoiceError(RuntimeError):
    """The record of which folder pretraining reads names no folder of the base dir."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def data_dir() -> Path:
    """The shard folder the readers use: the one chosen last (see `choose_folder`), else `base_data`."""
    base = get_base_dir()
    record = base / CHOICE_FILE
    if not record.is_file():
        return base / DEFAULT_FOLDER
    name = record.read_text(encoding="utf-8").strip()
    if not FOLDER_RE.match(name):
        raise DataChoiceError(
            f"{record} should name a shard folder in {base} (like {DEFAULT_FOLDER}), not {name!r}; "
            f"delete it to read {DEFAULT_FOLDER}, or run ./prepare.sh again"
        )
    return base / name


def choose_folder(name: str) -> Path:
    """Make `$NANOCHAT_BASE_DIR/name` the folder the readers use from now on; return it."""
    if not FOLDER_RE.match(name):
        raise DataChoiceError(f"{name!r} is not a folder name (one path component, no leading dot)")
    base = get_base_dir()
    base.mkdir(parents=True, exist_ok=True)
    atomic_write(base / CHOICE_FILE, name + "\n")
    return base / name


def list_shards(directory: Path | None = None) -> dict[int, Path]:
    """Complete shards in `directory` by number (`.part` files are ignored)."""
    directory = Path(directory) if directory else data_dir()
    if not directory.is_dir():
        return {}
    found = {}
    for entry in directory.iterdir():
        m = SHARD_RE.match(entry.name)
        if m:
            found[int(m.group(1))] = entry
    return dict(sorted(found.items()))


def split_shards(split: str, directory: Path | None = None) -> dict[int, Path]:
    """Shards of one split: the last shard is `val`, the rest `train`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    shards = list_shards(directory)
    where = Path(directory) if directory else data_dir()
    if len(shards) < 2:
        raise FileNotFoundError(
            f"{where} holds {len(shards)} shard(s); at least 2 are needed (the last one is the "
            "validation split). Run `python -m nanochat.dataset -n 8` or `--from PATH`, or ./prepare.sh."
        )
    numbers = list(shards)
    chosen = numbers[-1:] if split == "val" else numbers[:-1]
    return {n: shards[n] for n in chosen}
