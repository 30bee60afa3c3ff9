"""Upload the folders ./hf_prepare.sh prepared to the HuggingFace Hub, one model repo each.

    python upload_to_hf.py --username USER --dry-run     # what would go where; no network at all
    python upload_to_hf.py --username USER               # create the repos (if needed) and upload
    python upload_to_hf.py --username USER --stages sft --private

Needs a token with write access: `hf auth login` (`huggingface-cli login` in older
huggingface_hub releases) or the HF_TOKEN environment variable.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from nanochat.flags import FlagParser
from sharing.hf_share import EXIT_NOTHING, PIPELINE, ShareError, default_out_dir, parse_stages, read_share_info

TOKEN_HINT = "run `hf auth login` (`huggingface-cli login` in older huggingface_hub releases) or set HF_TOKEN to a token with write access"


@dataclass(frozen=True)
class Prepared:
    """A folder ready to become the Hub repo `repo_id`."""

    path: Path
    repo_id: str
    stage: str
    share: dict  # the folder's hf_share record: stage, model tag, step, repo id


def prepare_hint(username: str, stages: tuple[str, ...]) -> str:
    return f"run ./hf_prepare.sh --author {username} --stages {','.join(stages)} first"


def find_prepared(root: Path, stages: tuple[str, ...], username: str) -> list[Prepared]:
    """Prepared folders in `root` for the stages, base first, so a card's base_model exists before it is named."""
    if not root.is_dir():
        raise ShareError(f"no prepared folders: {root} does not exist; {prepare_hint(username, stages)}", EXIT_NOTHING)
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        share = read_share_info(folder)
        if share is not None and share["stage"] in stages:
            found.append(Prepared(folder, share["repo_id"], share["stage"], share))
    missing = [stage for stage in stages if stage not in {p.stage for p in found}]
    if not found:
        raise ShareError(f"no prepared folder in {root} for {', '.join(stages)}; {prepare_hint(username, stages)}", EXIT_NOTHING)
    for stage in missing:
        print(f"note: no prepared folder for {stage} in {root} (./hf_prepare.sh prepares one if it has a checkpoint)")
    return sorted(found, key=lambda p: (PIPELINE.index(p.stage), p.repo_id))


def check_owner(prepared: list[Prepared], username: str) -> None:
    """The model cards name their repo ids and lineage; uploading them elsewhere would leave dangling links."""
    foreign = [p for p in prepared if p.repo_id.split("/")[0] != username]
    if foreign:
        names = ", ".join(f"{p.path.name} ({p.repo_id})" for p in foreign)
        raise ShareError(f"prepared for another author: {names}; run ./hf_prepare.sh --author {username} again", EXIT_NOTHING)


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """(path inside the repo, size in bytes) of every file that would be uploaded."""
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def human_size(size: int) -> str:
    value, unit = float(size), "B"
    for bigger in ("KB", "MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


def describe_plan(prepared: list[Prepared], private: bool) -> str:
    """What an upload would do: per repo, its visibility, source folder, files and sizes."""
    lines = []
    for p in prepared:
        files = folder_files(p.path)
        lines.append(f"{p.repo_id} ({'private' if private else 'public'}) <- {p.path}")
        lines += [f"  {size:>15,}  {name}" for name, size in files]
        lines.append(f"  {len(files)} files, {human_size(sum(size for _, size in files))}")
    return "\n".join(lines)


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ShareError(f"no HuggingFace token found: {TOKEN_HINT}", EXIT_NOTHING)
    return token


def upload(prepared: list[Prepared], private: bool, token: str) -> list[str]:
    """Create each repo (kept as it is when it exists) and upload its folder; returns the repo URLs."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    urls = []
    for p in prepared:
        share = p.share
        message = f"nanochat {share['stage']} model {share['model_tag']}, step {share['step']:,}"
        # the hub raises its own HTTP errors and its HTTP library's network errors, with no common base
        try:
            url = api.create_repo(p.repo_id, repo_type="model", private=private, exist_ok=True)
            api.upload_folder(repo_id=p.repo_id, repo_type="model", folder_path=p.path, commit_message=message)
        except Exception as exc:
            raise ShareError(f"uploading {p.path} to {p.repo_id} failed: {exc}") from None
        print(f"uploaded {p.path.name} -> {url}", flush=True)
        urls.append(str(url))
    return urls


def parse_args(argv=None) -> argparse.Namespace:
    parser = FlagParser(
        prog="python upload_to_hf.py",
        description="Upload the folders ./hf_prepare.sh prepared to the HuggingFace Hub (one model repo per stage).",
        epilog=f"Authentication: {TOKEN_HINT}. Exit status: 0 done; 1 upload failed; 2 nothing to upload, no token, "
        "or folders prepared for another author.",
    )
    parser.add_argument("--username", metavar="USER", required=True, help="HuggingFace user or organisation to upload to (the --author given to hf_prepare.sh)")
    parser.add_argument("--stages", type=parse_stages, default=PIPELINE, help="comma-separated stages to upload (default: base,mid,sft,rl, those prepared)")
    parser.add_argument("--private", action="store_true", help="create new repos private (an existing repo keeps its visibility)")
    parser.add_argument("--dry-run", action="store_true", help="list the repos, files and sizes that would be uploaded, without any network access")
    parser.add_argument("--folder-root", metavar="DIR", type=Path, default=None, help="where the prepared folders are (default: $NANOCHAT_BASE_DIR/hf, hf_prepare.sh's --out)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = (args.folder_root or default_out_dir()).expanduser()
    try:
        prepared = find_prepared(root, args.stages, args.username)
        check_owner(prepared, args.username)
        if args.dry_run:
            print("dry run: nothing is uploaded and the network is not used\n")
            print(describe_plan(prepared, args.private))
            return 0
        token = hub_token()
        print(describe_plan(prepared, args.private), flush=True)
        upload(prepared, args.private, token)
    except ShareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
