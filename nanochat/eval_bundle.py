"""The CORE evaluation bundle on disk: where it is, fetching it, and reading its tasks.

The bundle is the one nanochat uses (DCLM's 22 "core" in-context-learning tasks,
in MosaicML's eval-gauntlet format), one folder holding:
    core.yaml            `icl_tasks:` a list of {label, dataset_uri, num_fewshot: [k],
                         icl_task_type, continuation_delimiter (default " ")}
    eval_meta_data.csv   one row per task: "Eval Task", "Random baseline" (a percentage), ...
    eval_data/<uri>      one JSON object per line per task

    python -m nanochat.eval_bundle          # fetch it into $NANOCHAT_BASE_DIR/eval_bundle
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from nanochat.common import get_base_dir
from nanochat.download import DownloadError, check_reachable, download_file
from nanochat.flags import FlagParser

DEFAULT_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_ENV = "NANOCHAT_EVAL_BUNDLE"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
CONFIG_FILE = "core.yaml"
META_FILE = "eval_meta_data.csv"
DATA_DIR = "eval_data"
FETCH_HINT = "fetch it with `python -m nanochat.eval_bundle` (or ./prepare.sh), or point --bundle / $NANOCHAT_EVAL_BUNDLE at an unpacked copy"


class BundleError(RuntimeError):
    """The bundle is missing, incomplete or malformed; the message says what and how to fix it."""


@dataclass(frozen=True)
class TaskSpec:
    """One CORE task as core.yaml and eval_meta_data.csv describe it."""

    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent, as the CSV has it


def default_bundle_dir() -> Path:
    return get_base_dir() / "eval_bundle"


def resolve_bundle_dir(override: str | Path | None = None) -> Path:
    """The bundle folder to read: `override`, else $NANOCHAT_EVAL_BUNDLE, else the fetched one.

    Raises BundleError when that folder is not a complete bundle.
    """
    chosen = override or os.environ.get(BUNDLE_ENV) or None
    path = Path(chosen).expanduser() if chosen else default_bundle_dir()
    missing = [name for name in (CONFIG_FILE, META_FILE, DATA_DIR) if not (path / name).exists()]
    if missing:
        where = "" if chosen else " (the default location)"
        raise BundleError(f"no CORE eval bundle at {path}{where}: missing {', '.join(missing)}; {FETCH_HINT}")
    return path


# ---------------------------------------------------------------- fetching


def fetch_eval_bundle(url: str = DEFAULT_URL, *, retries: int = 5, backoff: float = 2.0) -> Path:
    """Download and unpack the bundle into $NANOCHAT_BASE_DIR/eval_bundle unless it is there.

    The folder only ever appears complete: the zip is unpacked beside it and
    renamed into place. The zip is deleted afterwards; the folder is what counts.
    """
    target = default_bundle_dir()
    if target.is_dir():
        return target
    archive = target.with_name("eval_bundle.zip")
    try:
        check_reachable(url)  # offline: say so in seconds, not after every retry
        download_file(url, archive, retries=retries, backoff=backoff, validate=_check_archive)
    except DownloadError as exc:
        raise BundleError(
            f"could not download the CORE eval bundle: {exc}. Offline? Copy eval_bundle.zip from {DEFAULT_URL} "
            f"by other means and run `python -m nanochat.eval_bundle --url file:///path/to/eval_bundle.zip`, "
            f"or point --bundle / ${BUNDLE_ENV} at an unpacked copy"
        ) from exc
    _unpack_into_place(archive, target)
    archive.unlink(missing_ok=True)
    return target


def _check_archive(path: Path) -> None:
    """Reject a download that is not a readable zip holding core.yaml (download_file retries it)."""
    with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
        if bad is not None:
            raise ValueError(f"corrupt member {bad}")
        if not any(Path(name).name == CONFIG_FILE for name in zf.namelist()):
            raise ValueError(f"no {CONFIG_FILE} in the archive")


def _unpack_into_place(archive: Path, target: Path) -> None:
    # Unpacked next to the target so the final rename stays on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=".eval_bundle.", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        root = _bundle_root(staging)
        try:
            os.replace(root, target)
        except OSError:
            if not target.is_dir():  # someone else finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _bundle_root(unpacked: Path) -> Path:
    """The folder holding core.yaml: the archive's top folder (`eval_bundle/`) or its root."""
    candidates = sorted(unpacked.rglob(CONFIG_FILE), key=lambda p: len(p.parts))
    if not candidates:
        raise BundleError(f"the archive has no {CONFIG_FILE}")
    return candidates[0].parent


# ---------------------------------------------------------------- reading


def load_task_specs(bundle: Path) -> list[TaskSpec]:
    """Every task of core.yaml, in its order, with its random baseline from the CSV."""
    config = yaml.safe_load((bundle / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    tasks = config.get("icl_tasks")
    if not isinstance(tasks, list) or not tasks:
        raise BundleError(f"{bundle / CONFIG_FILE} has no icl_tasks list")
    baselines = load_random_baselines(bundle)
    return [_task_spec(entry, baselines, bundle) for entry in tasks]


def _task_spec(entry: dict, baselines: dict[str, float], bundle: Path) -> TaskSpec:
    label = entry.get("label")
    if entry.get("icl_task_type") not in TASK_TYPES:
        raise BundleError(f"task {label!r}: icl_task_type {entry.get('icl_task_type')!r} is not one of {', '.join(TASK_TYPES)}")
    if label not in baselines:
        raise BundleError(f"task {label!r} has no random baseline in {bundle / META_FILE}")
    shots = entry.get("num_fewshot", [0])
    # The gauntlet format lists several shot counts; CORE uses one per task, the first.
    shots = shots[0] if isinstance(shots, list) else shots
    return TaskSpec(
        label=label,
        task_type=entry["icl_task_type"],
        dataset_uri=entry["dataset_uri"],
        num_fewshot=int(shots),
        continuation_delimiter=entry.get("continuation_delimiter", " "),
        random_baseline=baselines[label],
    )


def load_random_baselines(bundle: Path) -> dict[str, float]:
    """Task label -> chance accuracy in percent."""
    with open(bundle / META_FILE, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise BundleError(f"{bundle / META_FILE} lacks the 'Eval Task' / 'Random baseline' columns")
    return {row["Eval Task"]: float(row["Random baseline"]) for row in rows}


def load_task_data(bundle: Path, spec: TaskSpec) -> list[dict]:
    path = bundle / DATA_DIR / spec.dataset_uri
    if not path.is_file():
        raise BundleError(f"task {spec.label!r}: data file {path} is missing")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = FlagParser(prog="python -m nanochat.eval_bundle", description="Fetch the CORE evaluation bundle into $NANOCHAT_BASE_DIR/eval_bundle (skipped when present).")
    p.add_argument("--url", default=DEFAULT_URL, help="where to download eval_bundle.zip (http(s):// or file://; default %(default)s)")
    p.add_argument("--retries", type=int, default=5, help="download attempts before giving up (default %(default)s)")
    p.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubling each time (default %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        path = fetch_eval_bundle(args.url, retries=args.retries, backoff=args.backoff)
        tasks = load_task_specs(resolve_bundle_dir(path))
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"CORE eval bundle: {path} ({len(tasks)} tasks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
