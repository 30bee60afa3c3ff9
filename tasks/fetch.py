"""Fetch the post-training data that isn't on the Hub: identity conversations and the spelling word list.

    python -m tasks.fetch          # skips files already present

The HuggingFace datasets themselves are fetched (and cached) on first use by
their loaders; see tasks/__init__.py for the local-file variables.
"""

from __future__ import annotations

import argparse
import sys

from nanochat.common import setup_logging
from nanochat.download import DownloadError, download_file
from tasks.identity import default_identity_path
from tasks.spelling import words_path

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.fetch", description=__doc__.split("\n")[0])
    p.add_argument("--identity-url", default=IDENTITY_URL, help="where identity_conversations.jsonl comes from (default: nanochat's)")
    args = p.parse_args(argv)
    setup_logging()
    try:
        identity = download_file(args.identity_url, default_identity_path(), retries=3, backoff=1.0)
        words = words_path()
    except DownloadError as exc:
        print(f"error: {exc}\nPost-training can still run from local files (python -m tasks.sample_data --help).", file=sys.stderr)
        return 2
    print(f"identity conversations: {identity}\nspelling word list: {words}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
