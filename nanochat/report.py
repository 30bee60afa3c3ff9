"""The report card: one markdown section per stage under $NANOCHAT_BASE_DIR/report/."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from nanochat.common import get_base_dir


def report_dir() -> Path:
    path = get_base_dir() / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_section(slug: str, title: str, items: dict, notes: str = "") -> Path:
    """Write (atomically, replacing any earlier one) the section `slug` of the report."""
    lines = [f"## {title}", f"timestamp: {datetime.datetime.now().isoformat(timespec='seconds')}", ""]
    lines += [f"- {key}: {_format(value)}" for key, value in items.items()]
    if notes:
        lines += ["", notes.rstrip()]
    path = report_dir() / f"{slug}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
