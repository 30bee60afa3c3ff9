"""The report card: one markdown section per stage under $NANOCHAT_BASE_DIR/report/.

Each stage script calls `write_section`, which writes `<slug>.md` for people and a
`<slug>.json` sidecar holding the section's numbers for machines. Assembling the
card reads only the sidecars for numbers, so a change in how a section is worded
can never break the summary table.

    python -m nanochat.report reset      # start a new report (old sections are archived)
    python -m nanochat.report generate   # assemble report/report.md and copy it here

The training stages draw their curves into the same folder (curves-<stage>.png, see
nanochat.curves); the card links them as images, relative to the folder, and its copy
links them relative to where the copy goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from nanochat.common import environment_report, get_base_dir
from nanochat.curves import curve_name, list_curves
from nanochat.fileio import atomic_write
from nanochat.progress import format_duration
from nanochat.stages import STAGES, chat_eval_section

# Sections in the order the pipeline writes them; sections with other slugs follow, by name.
SECTION_ORDER = ("header", "tokenizer", *(section for stage in STAGES.values() for section in stage.sections), "stage-times")
SUMMARY_STAGES = tuple(STAGES)
CHAT_METRICS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE")
SUMMARY_METRICS = ("CORE",) + CHAT_METRICS
WALL_TIME_KEY = "wall time (s)"
REPORT_NAME = "report.md"
ARCHIVE_NAME = "archive"
CODE_SUFFIXES = (".py", ".sh", ".md")
REPO_ROOT = Path(__file__).resolve().parent.parent


class SidecarError(ValueError):
    """A `<slug>.json` sidecar that cannot be read back."""


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


def _is_number(value) -> bool:
    # bool is an int subclass, but True is not a measurement
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_number(value):
    # JSON has no NaN or infinity; null keeps the sidecar readable by any JSON parser
    return value if math.isfinite(value) else None


def sidecar_metrics(items: dict, metrics: dict | None) -> dict:
    """The numbers a section's sidecar stores: its numeric items, then `metrics` on top."""
    numbers = {key: _json_number(value) for key, value in items.items() if _is_number(value)}
    for key, value in (metrics or {}).items():
        if not _is_number(value):
            raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}")
        numbers[key] = _json_number(value)
    return numbers


def _check_slug(slug: str) -> None:
    if not slug or "/" in slug or "\\" in slug or slug.startswith(".") or slug == ARCHIVE_NAME:
        raise ValueError(f"bad report section slug {slug!r}: use a plain name such as 'base-eval'")
    if f"{slug}.md" == REPORT_NAME:
        raise ValueError(f"the slug {slug!r} is reserved for the assembled report")


def write_section(slug: str, title: str, items: dict, notes: str = "", metrics: dict | None = None) -> Path:
    """Write (atomically, replacing any earlier one) the section `slug` of the report.

    The sidecar `<slug>.json` gets every numeric item plus `metrics` (numbers that
    should be aggregated without being listed, or listed more precisely than shown).
    """
    _check_slug(slug)
    timestamp = datetime.datetime.now().isoformat(timespec="seconds")
    numbers = sidecar_metrics(items, metrics)
    lines = [f"## {title}", f"timestamp: {timestamp}", ""]
    lines += [f"- {key}: {_format(value)}" for key, value in items.items()]
    if notes:
        lines += ["", notes.rstrip()]
    directory = report_dir()
    sidecar = {"slug": slug, "title": title, "timestamp": timestamp, "metrics": numbers}
    # Sidecar first: whenever the markdown is new, so are its numbers.
    atomic_write(directory / f"{slug}.json", json.dumps(sidecar, indent=2, allow_nan=False) + "\n")
    path = directory / f"{slug}.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def read_metrics(path: Path) -> dict:
    """The metrics of one sidecar; SidecarError names the file (and line) when it is unusable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SidecarError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SidecarError(f"{path}: cannot read: {exc}") from exc
    metrics = data.get("metrics") if isinstance(data, dict) else None
    if not isinstance(metrics, dict):
        raise SidecarError(f'{path}: expected an object with a "metrics" object')
    bad = [key for key, value in metrics.items() if value is not None and not _is_number(value)]
    if bad:
        raise SidecarError(f"{path}: metrics that are not numbers: {', '.join(map(repr, bad))}")
    return metrics


def section_slugs(directory: Path) -> list[str]:
    """Slugs of the sections present, in pipeline order, then any others by name."""
    present = {p.stem for p in directory.glob("*.md") if p.name != REPORT_NAME and not p.name.startswith(".")}
    known = [slug for slug in SECTION_ORDER if slug in present]
    return known + sorted(present - set(known))


def load_all_metrics(directory: Path, slugs: list[str]) -> tuple[dict[str, dict], list[str]]:
    """Metrics per slug (empty where a section has no sidecar) and a message per unreadable sidecar."""
    metrics, problems = {}, []
    for slug in slugs:
        path = directory / f"{slug}.json"
        metrics[slug] = {}
        if not path.exists():
            continue
        try:
            metrics[slug] = read_metrics(path)
        except SidecarError as exc:
            problems.append(str(exc))
    return metrics, problems


def _summary_value(metrics: dict[str, dict], metric: str, stage: str):
    # CORE scores raw completions, so only the base model has it; chat metrics come from each stage's chat eval
    if metric == "CORE":
        return metrics.get("base-eval", {}).get(metric) if stage == "base" else None
    return metrics.get(chat_eval_section(stage), {}).get(metric)


def _format_score(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_table(metrics: dict[str, dict]) -> str:
    """Markdown table: one row per summary metric, one column per stage, "-" where missing."""
    header = "| Metric | " + " | ".join(stage.upper() for stage in SUMMARY_STAGES) + " |"
    rule = "|" + "---|" * (len(SUMMARY_STAGES) + 1)
    rows = [header, rule]
    for metric in SUMMARY_METRICS:
        cells = [_format_score(_summary_value(metrics, metric, stage)) for stage in SUMMARY_STAGES]
        rows.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def total_wall_time(metrics: dict[str, dict]) -> float | None:
    """Sum of every section's wall time, or None when no section recorded one."""
    times = [m[WALL_TIME_KEY] for m in metrics.values() if m.get(WALL_TIME_KEY) is not None]
    return sum(times) if times else None


def _git(*args: str, root: Path) -> str | None:
    """Output of a git command in `root`, or None where git or the checkout is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, errors="replace", timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_info(root: Path = REPO_ROOT) -> dict[str, str]:
    """Commit, branch and whether tracked files have uncommitted changes; empty outside a checkout."""
    commit = _git("rev-parse", "HEAD", root=root)
    if commit is None:
        return {}
    status = _git("status", "--porcelain", "--untracked-files=no", root=root)
    return {
        "commit": commit.strip(),
        "branch": (_git("rev-parse", "--abbrev-ref", "HEAD", root=root) or "?").strip(),
        "dirty": "unknown" if status is None else ("yes" if status.strip() else "no"),
    }


def code_files(root: Path = REPO_ROOT) -> list[Path]:
    """The repo's .py/.sh/.md files: git's tracked files when possible, else a walk that skips hidden and build folders."""
    listed = _git("ls-files", "-z", "--", *(f"*{suffix}" for suffix in CODE_SUFFIXES), root=root)
    if listed is not None:
        return [root / name for name in listed.split("\0") if name and (root / name).is_file()]
    found = []
    for folder, subfolders, names in os.walk(root):
        # pruning in place keeps the walk out of .venv, .git and build outputs
        subfolders[:] = sorted(d for d in subfolders if not (d.startswith(".") or d == "__pycache__" or d.endswith(".egg-info")))
        found += [Path(folder) / name for name in sorted(names) if name.endswith(CODE_SUFFIXES)]
    return found


def code_size(root: Path = REPO_ROOT) -> dict[str, int]:
    files = code_files(root)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return {"files": len(files), "lines": sum(len(t.splitlines()) for t in texts), "characters": sum(len(t) for t in texts)}


def system_lines() -> list[str]:
    try:
        facts = environment_report()
    except (ValueError, RuntimeError) as exc:  # e.g. a device that is not there
        return [f"- system info unavailable: {exc}"]
    return [f"- {key}: {value}" for key, value in facts.items()]


def header_text(now: datetime.datetime) -> str:
    lines = ["# nanochat report card", "", f"generated: {now.isoformat(timespec='seconds')}", "", "## Environment", ""]
    lines += system_lines()
    git = git_info()
    if git:
        lines.append(f"- git: {git['commit'][:12]} on {git['branch']}, uncommitted changes: {git['dirty']}")
    else:
        lines.append("- git: not a git checkout")
    size = code_size()
    lines.append(f"- code: {size['lines']:,} lines, {size['characters']:,} characters in {size['files']:,} .py/.sh/.md files")
    return "\n".join(lines)


def curves_section(directory: Path) -> str | None:
    """Markdown embedding the folder's curve PNGs, pipeline stages first; None when there are none."""
    present = list_curves(directory)
    ordered = [curve_name(stage) for stage in STAGES if curve_name(stage) in present]
    ordered += sorted(set(present) - set(ordered))
    if not ordered:
        return None
    images = [f"![{name[len('curves-'):-len('.png')]}]({name})" for name in ordered]
    return "## Training curves\n\n" + "\n\n".join(images)


def relink_curves(text: str, prefix: str) -> str:
    """The card's image links with `prefix` (a path to the report folder) in front, for a copy elsewhere."""
    return re.sub(r"\]\((curves-[a-z0-9_-]+\.png)\)", lambda m: f"]({prefix}/{m.group(1)})", text)


def assemble(directory: Path, now: datetime.datetime) -> tuple[str, list[str]]:
    """The whole report card as markdown, plus a message per sidecar that could not be read."""
    slugs = section_slugs(directory)
    metrics, problems = load_all_metrics(directory, slugs)
    parts = [header_text(now)]
    parts += [(directory / f"{slug}.md").read_text(encoding="utf-8").rstrip() for slug in slugs]
    if not [slug for slug in slugs if slug != "header"]:
        parts.append(f"The report is empty: no stage has written a section to {directory} yet.")
        return "\n\n".join(parts) + "\n", problems
    curves = curves_section(directory)
    if curves:
        parts.append(curves)
    parts.append("## Summary\n\n" + summary_table(metrics))
    total = total_wall_time(metrics)
    parts.append(f"Total wall-clock time: {format_duration(total) if total is not None else 'unknown (no stage recorded it)'}")
    if problems:
        parts.append("Unreadable metrics (left out above):\n\n" + "\n".join(f"- {p}" for p in problems))
    return "\n\n".join(parts) + "\n", problems


def generate() -> tuple[Path, list[str]]:
    """Write report/report.md and a copy in the current directory; returns the copy and any sidecar problems."""
    directory = report_dir()
    text, problems = assemble(directory, datetime.datetime.now())
    path = directory / REPORT_NAME
    atomic_write(path, text)
    copy = Path.cwd() / REPORT_NAME
    if copy.resolve() != path.resolve():
        atomic_write(copy, relink_curves(text, Path(os.path.relpath(directory, copy.parent)).as_posix()))
    return copy, problems


def _archive_folder(directory: Path, now: datetime.datetime) -> Path:
    base = directory / ARCHIVE_NAME / now.strftime("%Y%m%d-%H%M%S")
    folder, n = base, 1
    while folder.exists():  # two resets within one second
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    return folder


def reset(now: datetime.datetime | None = None) -> Path | None:
    """Archive the current report's files and start a new one; returns the archive folder, if anything was moved."""
    now = now or datetime.datetime.now()
    directory = report_dir()
    old = [p for p in directory.iterdir() if p.is_file()]
    archive = None
    if old:
        archive = _archive_folder(directory, now)
        archive.mkdir(parents=True)
        for path in old:
            os.replace(path, archive / path.name)
    write_section("header", "Run", {"started": now.isoformat(timespec="seconds")}, metrics={"started (unix time)": now.timestamp()})
    return archive


def stage_times(marks: Path, stages: list[str]) -> str:
    """Write the "stage-times" section from the `<stage>.seconds` files a pipeline
    run leaves in `marks` (a stage skipped as done keeps the time of the run that
    did it); returns the same as a markdown table."""
    seconds = {}
    for stage in stages:
        path = marks / f"{stage}.seconds"
        if path.is_file() and path.read_text().strip().isdigit():
            seconds[stage] = int(path.read_text())
    total = sum(seconds.values())
    rows = ["| stage | wall time |", "|---|---|"] + [f"| {s} | {format_duration(t)} |" for s, t in seconds.items()]
    rows.append(f"| **total** | **{format_duration(total)}** |")
    write_section("stage-times", "Wall time by stage", {s: format_duration(t) for s, t in seconds.items()},
                  notes="\n".join(rows), metrics={**{f"{s} (s)": t for s, t in seconds.items()}, "total (s)": total})
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nanochat.report", description="Assemble or restart the report card in $NANOCHAT_BASE_DIR/report/.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,reset,stage-times}")
    commands.add_parser(
        "generate", help="write report/report.md from the stage sections and copy it to the current directory",
        description="Write report/report.md (environment, git, code size, every section, summary table, total time) and copy it to the current directory. Exits 1 if a metrics sidecar could not be read; the report is written anyway.",
    )
    commands.add_parser(
        "reset", help="start a new report; the old sections move to report/archive/<timestamp>/",
        description="Move every file of the current report into report/archive/<timestamp>/ and write a header section with the start time.",
    )
    times = commands.add_parser(
        "stage-times", help="print and record the wall time of each pipeline stage (speedrun.sh calls it)",
        description="Read MARKS/<stage>.seconds for each STAGE, print a markdown table and write the stage-times section.",
    )
    times.add_argument("marks", type=Path, help="folder of <stage>.seconds files")
    times.add_argument("stages", nargs="+", help="stages, in the order to list them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "reset":
        archive = reset()
        print(f"new report started in {report_dir()}" + (f"; previous one archived to {archive}" if archive else ""))
        return 0
    if args.command == "stage-times":
        print(stage_times(args.marks, args.stages))
        return 0
    copy, problems = generate()
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"report written to {report_dir() / REPORT_NAME} and copied to {copy}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
