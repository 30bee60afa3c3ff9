"""Checking a row's fields, and reading a hand-edited JSON lines file line by line.

The Hub's datasets and their local copies go through `datasets.load_dataset`
(tasks.hub). The identity conversations (tasks.identity) do not: people edit that
file by hand, so every error names its line, and one line's content may be a
string where another's is a list of tool-call parts, which no single Arrow schema
(what `datasets` builds) can hold.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.base import TaskDataError


def read_json_lines(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for each non-blank line of `path`, where being "<path> line N"."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskDataError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((where, row))
    return rows


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
