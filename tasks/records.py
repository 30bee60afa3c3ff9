"""Rows of a dataset read from local files: parquet, JSON lines, or JSON.

A path is one file or a folder of them (its .parquet / .jsonl / .json files,
in name order). Parquet stays an Arrow table and rows become dicts only when
asked for, so a large split costs little memory. Every row can say where it
came from ("train.jsonl line 7"), which is what data errors quote.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.base import TaskDataError

SUFFIXES = (".parquet", ".jsonl", ".json")


class _FileRows:
    """The rows of one file, with a label for each."""

    def __init__(self, path: Path, rows: pa.Table | list[dict], line_numbers: list[int] | None):
        self.path, self.rows, self.line_numbers = path, rows, line_numbers

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, k: int) -> dict:
        if isinstance(self.rows, pa.Table):
            return self.rows.slice(k, 1).to_pylist()[0]
        return self.rows[k]

    def where(self, k: int) -> str:
        if self.line_numbers is not None:
            return f"{self.path} line {self.line_numbers[k]}"
        return f"{self.path} row {k} (counting from 0)"


class Records:
    """All rows of a list of files, as one indexable sequence of dicts."""

    def __init__(self, files: list[_FileRows]):
        self.files = files
        self._ends = []
        for f in files:
            self._ends.append((self._ends[-1] if self._ends else 0) + len(f))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> dict:
        f, k = self._locate(index)
        return f.row(k)

    def where(self, index: int) -> str:
        """Which file, and which line or row in it, holds row `index`."""
        f, k = self._locate(index)
        return f.where(k)

    def _locate(self, index: int) -> tuple[_FileRows, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} rows)")
        which = bisect.bisect_right(self._ends, index)
        return self.files[which], index - (self._ends[which - 1] if which else 0)


def data_files(path: Path) -> list[Path]:
    """`path` itself if it is a file, else the data files directly inside the folder."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise TaskDataError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise TaskDataError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
        return files
    raise TaskDataError(f"{path}: no such file or folder")


def read_records(paths: list[Path]) -> Records:
    return Records([_read_file(Path(p)) for p in paths])


def _read_file(path: Path) -> _FileRows:
    if path.suffix == ".parquet":
        try:
            return _FileRows(path, pq.read_table(path, memory_map=True), None)
        except (pa.ArrowException, OSError) as exc:
            raise TaskDataError(f"{path}: not a readable parquet file ({exc})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskDataError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    # `.json` may be one array of rows, or JSON lines (what datasets' to_json writes)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return _json_array(path, text)
    return _json_lines(path, text)


def _json_lines(path: Path, text: str) -> _FileRows:
    rows, line_numbers = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        line_numbers.append(number)
    return _FileRows(path, rows, line_numbers)


def _json_array(path: Path, text: str) -> _FileRows:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(rows, list):
        raise TaskDataError(f"{path}: expected a JSON array of objects")
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TaskDataError(f"{path} item {k}: expected a JSON object, got {type(row).__name__}")
    return _FileRows(path, rows, None)


def field(row: dict, name: str, kind: type | tuple[type, ...], where: str):
    """row[name], checked to be of `kind`; a TaskDataError naming the row and field otherwise."""
    if name not in row:
        raise TaskDataError(f"{where}: missing field {name!r} (has {', '.join(map(repr, row)) or 'no fields'})")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(k.__name__ for k in kinds)
        raise TaskDataError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__} {value!r:.80}")
    return value
