"""The pretraining shard folder's layout, which the downloader, the corpus importer and the readers share.

`$NANOCHAT_BASE_DIR/base_data/shard_XXXXX.parquet` (five digits); a `.part`
file is a shard still being written and does not count. The highest-numbered
shard is the validation split, every other one is training data.
"""

from __future__ import annotations

import re
from pathlib import Path

from nanochat.common import get_base_dir

SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")
SPLITS = ("train", "val")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def data_dir() -> Path:
    return get_base_dir() / "base_data"


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
