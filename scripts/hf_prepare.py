"""Share trained models on the HuggingFace Hub: prepare upload folders, and install a shared model back.

    ./hf_prepare.sh --author USER                          # one folder per trained stage, in $NANOCHAT_BASE_DIR/hf/
    ./hf_prepare.sh --author USER --stages sft,rl --out ~/to_upload
    python -m scripts.hf_prepare --download USER/nanochat-d20-sft   # then ./chat_cli.sh talks to it

What a prepared folder holds: sharing/hf_share.py. upload_to_hf.py uploads the folders;
`--download` installs the nanochat/ files of a shared repo (or of a local folder) into
$NANOCHAT_BASE_DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanochat.flags import FlagParser
from sharing.hf_folders import prepare_all
from sharing.hf_install import chat_command, install_shared
from sharing.hf_share import HUB_NAME_RE, PIPELINE, ShareError, default_out_dir, parse_stages


def parse_args(argv=None) -> argparse.Namespace:
    parser = FlagParser(
        prog="python -m scripts.hf_prepare",
        description="Prepare HuggingFace Hub folders of your trained models (--author), or install a shared one (--download).",
        epilog="Exit status: 0 done; 1 failed (download error, refused to overwrite); 2 nothing to work with "
        "(no checkpoint, no tokenizer, not a shared nanochat model) or bad arguments.",
    )
    prep = parser.add_argument_group("prepare folders for upload_to_hf.py")
    prep.add_argument("--author", metavar="USER", help="HuggingFace user or organisation the repos will belong to (named in the model cards)")
    prep.add_argument("--stages", metavar="STAGES", type=parse_stages, default=PIPELINE, help="comma-separated stages to prepare (default: base,mid,sft,rl; stages without a checkpoint are skipped)")
    prep.add_argument("--out", metavar="DIR", type=Path, default=None, help="folder for the prepared repos (default: $NANOCHAT_BASE_DIR/hf)")
    prep.add_argument("--code-url", metavar="URL", default=None, help="where readers get this project's code; linked from the model cards")
    down = parser.add_argument_group("install a shared model into $NANOCHAT_BASE_DIR")
    down.add_argument("--download", metavar="REPO_ID_OR_FOLDER", help="Hub repo id (USER/nanochat-d20-sft) or a local copy of one")
    down.add_argument("--stage", choices=PIPELINE, default=None, help="stage to install it as (default: the one it was shared as)")
    down.add_argument("--model-tag", metavar="TAG", default=None, help="model tag to install it under (default: the one it was shared with)")
    down.add_argument("--force", action="store_true", help="replace a different tokenizer or checkpoint already there")
    args = parser.parse_args(argv)
    if (args.author is None) == (args.download is None):
        parser.error("give --author USER to prepare folders for upload, or --download REPO_ID to install a shared model")
    if args.author is not None and not HUB_NAME_RE.match(args.author):
        parser.error(f"--author {args.author!r} is not a valid HuggingFace user or organisation name")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.download is not None:
            stage, tag, step = install_shared(args.download, args.stage, args.model_tag, args.force)
            print(f"chat with it: {chat_command(stage, tag, step)}")
            return 0
        out_dir = (args.out or default_out_dir()).expanduser()
        folders = prepare_all(args.author, args.stages, out_dir, args.code_url)
    except ShareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    root_flag = f" --folder-root {out_dir}" if args.out else ""
    print(f"{len(folders)} folder(s) ready in {out_dir}; check them, then: python upload_to_hf.py --username {args.author}{root_flag} --dry-run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
