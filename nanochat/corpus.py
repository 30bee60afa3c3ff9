"""Turn your own text into pretraining shards (`python -m nanochat.dataset --from PATH`).

Accepts a file or a folder (searched recursively) of `.txt` (one document per
file), `.jsonl` (one JSON object per line with a string field `text`) and
`.parquet` (a `text` column). Long documents are split at paragraph breaks so
no document exceeds `max_doc_chars`. Every k-th document is held out for the
validation shard, which is written last so it carries the highest number.

Shards are written into a staging folder and moved into place only when the
whole import succeeded: a bad line or a killed process leaves no shard behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.shards import list_shards, shard_name

SUFFIXES = (".txt", ".jsonl", ".parquet")
ROWS_PER_GROUP = 1024


class CorpusError(ValueError):
    """The input cannot be imported; the message says which file and line."""


@dataclass
class ImportStats:
    files: int = 0
    train_docs: int = 0
    val_docs: int = 0
    chars: int = 0
    train_shards: int = 0

    def __str__(self) -> str:
        return (
            f"{self.files} file(s), {self.train_docs + self.val_docs:,} documents "
            f"({self.chars:,} characters) -> {self.train_shards} train shard(s) with {self.train_docs:,} "
            f"documents + 1 validation shard with {self.val_docs:,}"
        )


def find_inputs(source: Path) -> list[Path]:
    source = Path(source).expanduser()
    if source.is_file():
        if source.suffix.lower() not in SUFFIXES:
            raise CorpusError(f"{source}: unsupported file type (expected {', '.join(SUFFIXES)})")
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise CorpusError(f"{source}: no {', '.join(SUFFIXES)} files found")
        return files
    raise CorpusError(f"{source}: no such file or folder")


def read_documents(path: Path) -> Iterator[str]:
    """The raw documents of one input file, in order."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif suffix == ".jsonl":
        yield from _read_jsonl(path)
    else:
        yield from _read_parquet(path)


def _read_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CorpusError(f"{path}:{lineno}: expected an object with a string field 'text'")
            yield record["text"]


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise CorpusError(f"{path}: not a readable parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise CorpusError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
    for batch in pf.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def split_document(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most `max_chars`, preferring paragraph, then line, then word breaks."""
    text = text.strip()
    pieces = []
    while len(text) > max_chars:
        window = text[: max_chars + 1]
        cut = max(window.rfind("\n\n"), 0) or max(window.rfind("\n"), 0) or max(window.rfind(" "), 0) or max_chars
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    pieces.append(text)
    return [p for p in pieces if p]


class _ShardWriter:
    """Appends documents to numbered parquet shards, starting a new one every `shard_chars`."""

    def __init__(self, folder: Path, shard_chars: int):
        self.folder, self.shard_chars = folder, shard_chars
        self.count, self.rows, self.chars = 0, [], 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, doc: str) -> None:
        self.rows.append(doc)
        self.chars += len(doc)
        if len(self.rows) >= ROWS_PER_GROUP:
            self._flush_rows()
        if self.chars >= self.shard_chars:
            self.close_shard()

    def _flush_rows(self) -> None:
        if not self.rows:
            return
        table = pa.table({"text": pa.array(self.rows, type=pa.string())})
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.folder / shard_name(self.count), table.schema, compression="zstd")
        self.writer.write_table(table, row_group_size=ROWS_PER_GROUP)
        self.rows = []

    def close_shard(self) -> None:
        self._flush_rows()
        if self.writer is not None:
            self.writer.close()
            self.writer, self.count, self.chars = None, self.count + 1, 0


def import_corpus(
    source: Path,
    directory: Path,
    *,
    shard_chars: int = 250_000_000,
    max_doc_chars: int = 20_000,
    val_fraction: float = 0.01,
    overwrite: bool = False,
) -> ImportStats:
    """Write `source` as shards into `directory`; see the module docstring."""
    if not 0 < val_fraction < 1:
        raise CorpusError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if max_doc_chars < 100 or shard_chars < 1:
        raise CorpusError("max_doc_chars must be at least 100 and shard_chars positive")
    directory = Path(directory)
    if list_shards(directory) and not overwrite:
        raise CorpusError(f"{directory} already holds shards; pass --overwrite to replace them or --data-dir to write elsewhere")
    files = find_inputs(source)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".import-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        stats = _write_shards(files, staging, shard_chars, max_doc_chars, round(1 / val_fraction))
        _move_into_place(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stats


def _write_shards(files: list[Path], staging: Path, shard_chars: int, max_doc_chars: int, val_every: int) -> ImportStats:
    stats = ImportStats(files=len(files))
    train = _ShardWriter(staging, shard_chars)
    val_docs: list[str] = []
    index = 0
    for path in tqdm(files, unit="file", desc="import"):
        for raw in read_documents(path):
            for doc in split_document(raw, max_doc_chars):
                (val_docs.append if index % val_every == 0 else train.add)(doc)
                stats.chars += len(doc)
                index += 1
    train.close_shard()
    if train.count == 0:
        raise CorpusError(f"found {index} document(s): too few for a training and a validation split")
    val = _ShardWriter(staging, shard_chars=float("inf"))
    val.count = train.count
    for doc in val_docs:
        val.add(doc)
    val.close_shard()
    stats.train_docs, stats.val_docs, stats.train_shards = index - len(val_docs), len(val_docs), train.count
    return stats


def _move_into_place(staging: Path, directory: Path) -> None:
    for old in list_shards(directory).values():
        old.unlink()
    for shard in sorted(staging.glob("shard_*.parquet")):
        os.replace(shard, directory / shard.name)
