"""Import checkpoints made by the original DGX Spark nanochat (or karpathy/nanochat of October 2025).

    python -m scripts.import_nanochat ~/old/.cache/nanochat          # every stage of a run (base dir)
    python -m scripts.import_nanochat ~/old/.cache/nanochat/mid_checkpoints/d20 --step 765
    python -m scripts.import_nanochat jasonacox/nanochat-1.8B-sft     # a published model (Hub repo id)

Each checkpoint becomes one of ours, `$NANOCHAT_BASE_DIR/<stage>_checkpoints/<tag>/step_NNNNNN/`
(same stage, tag and step), and the original's tokenizer becomes ours; then every chat
surface, chat_eval, hf_prepare.sh and the next training stage work on it. The format and
the safety rules are in sharing/original.py. Everything is read and checked before
anything is written, and each checkpoint is written aside and renamed into place.
The optimizer state is not imported: resuming the original run mid-stage would also need
its data loader's position, and each next stage starts new optimizers anyway.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from nanochat.checkpoint import CheckpointError, list_steps, load_checkpoint, save_checkpoint, stage_dir
from nanochat.flags import FlagParser
from sharing.hf_install import chat_command, tokenizer_needs_install
from sharing.hf_share import EXIT_FAILED, EXIT_NOTHING, PIPELINE, REPO_ID_RE, ShareError
from sharing.original import Converted, OriginalFormatError, find_checkpoints, find_tokenizer, read_checkpoint, read_tokenizer
from nanochat.stages import AUTO_ORDER
from nanochat.tokenizer import MANIFEST_FILE, default_tokenizer_dir

# What a published model needs of its repo: no optimizer state, card or other files.
HUB_PATTERNS = ["model_*.pt", "meta_*.json", "config.json", "tokenizer/*"]


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(
        prog="python -m scripts.import_nanochat",
        description="Import checkpoints and the tokenizer of the original (DGX Spark) nanochat into $NANOCHAT_BASE_DIR.",
        epilog="Exit status: 0 imported (or already there); 1 refused to replace what is there, or the download failed; "
        "2 nothing importable (not the original's layout, a later nanochat, unsafe or inconsistent files) or bad arguments.",
    )
    p.add_argument("path", metavar="PATH", help="the original's base dir (its ~/.cache/nanochat), one checkpoint folder "
                   "(.../chatsft_checkpoints/d20), or a Hub repo id (jasonacox/nanochat-1.8B-sft)")
    p.add_argument("--stage", choices=PIPELINE, default=None,
                   help="from a base dir: import only this stage; else: the stage the checkpoint is (default: what its folder says)")
    p.add_argument("--step", type=int, default=None, help="the step to import (default: the newest)")
    p.add_argument("--model-tag", default=None, help="model tag to import under (default: the original's, d<depth> for a published model)")
    p.add_argument("--force", action="store_true", help="replace a different tokenizer, or a checkpoint of the same step, already there")
    return p.parse_args(argv)


def fetch(source: str) -> tuple[Path, str]:
    """(local folder, its name): a folder as it is; a Hub repo id downloaded (its name is the repo's)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, path.name
    if path.exists() or not REPO_ID_RE.match(source):
        raise OriginalFormatError(f"{source!r} is neither a folder nor a Hub repo id like jasonacox/nanochat-1.8B-sft")
    from huggingface_hub import snapshot_download

    # the hub raises its own HTTP errors and its HTTP library's network errors, with no common base
    try:
        return Path(snapshot_download(repo_id=source, allow_patterns=HUB_PATTERNS)), source.split("/")[1]
    except Exception as exc:
        raise ShareError(f"could not download {source}: {exc}") from None


def plan(folder: Path, name: str, args) -> list[tuple[Converted, str, str]]:
    """(converted checkpoint, stage, tag) for each checkpoint to import, every one read and checked."""
    imports, seen = [], set()
    for found in find_checkpoints(folder, args.stage, args.step, name):
        converted = read_checkpoint(found)
        stage = found.stage if args.stage is None else args.stage
        if stage is None:
            raise OriginalFormatError(f"{found.folder} does not say which stage it is; pass --stage ({', '.join(PIPELINE)})")
        tag = args.model_tag or found.tag or f"d{converted.config.n_layer}"
        if (stage, tag) in seen:
            raise OriginalFormatError(f"two {stage} checkpoints would both become tag {tag}; import them one folder at a time")
        seen.add((stage, tag))
        imports.append((converted, stage, tag))
    return imports


def already_there(converted: Converted, stage: str, tag: str, force: bool) -> bool:
    """True when this exact checkpoint is already imported; ShareError when something else is in its place."""
    tag_dir = stage_dir(stage) / tag
    steps, step = list_steps(tag_dir), converted.found.step
    if any(s != step for s in steps):
        raise ShareError(f"{tag_dir} already holds other checkpoints (steps {', '.join(map(str, steps))}), which the import "
                         "would mix with: pass --model-tag NAME to import under another tag", EXIT_FAILED)
    if not steps:
        return False
    try:
        there = load_checkpoint(tag_dir, step, with_training_state=False).model_state
        same = there.keys() == converted.state.keys() and all(torch.equal(there[k], converted.state[k]) for k in there)
    except CheckpointError:
        same = False
    if not same and not force:
        raise ShareError(f"{tag_dir} already holds a different step {step}; --force replaces it", EXIT_FAILED)
    return same


def in_place(tokenizer_dir: Path) -> bool:
    """Whether the original's tokenizer folder is ours (both use ~/.cache/nanochat) and holds none of our files yet:
    ours then go beside its tokenizer.pkl, whose name differs from all of them."""
    home = default_tokenizer_dir()
    return home.resolve() == tokenizer_dir.resolve() and not (home / MANIFEST_FILE).exists()


def write(converted: Converted, stage: str, tag: str, source: str) -> Path:
    found = converted.found
    origin = {"source": source, "folder": str(found.folder), "stage": stage, "model_tag": found.tag, "step": found.step,
              "meta": converted.meta}
    meta = {"model_config": converted.config.to_dict(), "imported_from": origin}
    return save_checkpoint(stage_dir(stage) / tag, found.step, model_state=converted.state, optim_state=None,
                           data_state=None, meta=meta)


def import_all(source: str, args) -> list[tuple[str, str, int]]:
    """Read and check everything, then write the tokenizer and each checkpoint; returns (stage, tag, step) of each."""
    folder, name = fetch(source)
    imports = plan(folder, name, args)
    tokenizer_dir = find_tokenizer(folder)
    tokenizer = read_tokenizer(tokenizer_dir)
    for converted, stage, _ in imports:
        if converted.config.vocab_size != tokenizer.get_vocab_size():
            raise OriginalFormatError(f"{stage} step {converted.found.step} has {converted.config.vocab_size:,} token ids, "
                                      f"the tokenizer {tokenizer.get_vocab_size():,}")
    write_tokenizer = in_place(tokenizer_dir) or tokenizer_needs_install(tokenizer, args.force)
    skip = [already_there(converted, stage, tag, args.force) for converted, stage, tag in imports]
    if write_tokenizer:
        print(f"tokenizer ({tokenizer.get_vocab_size():,} tokens) -> {tokenizer.save(default_tokenizer_dir())}")
    for (converted, stage, tag), present in zip(imports, skip):
        params = sum(t.numel() for t in converted.state.values())
        what = f"{stage} {tag} step {converted.found.step:,} ({params:,} parameters)"
        print(f"{what}: already imported" if present else f"{what} -> {write(converted, stage, tag, source)}")
        if converted.has_optimizer:
            print("  (its optimizer state is not imported: the next stage starts new optimizers)")
    return [(stage, tag, converted.found.step) for converted, stage, tag in imports]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        imported = import_all(args.path, args)
    except OriginalFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOTHING
    except ShareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    stage, tag, step = min(imported, key=lambda item: AUTO_ORDER.index(item[0]))  # the most advanced
    print(f"chat with it: {chat_command(stage, tag, step)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
