"""Install a shared model (a Hub repo id or a local copy of one) into $NANOCHAT_BASE_DIR: its checkpoint
and tokenizer as this project stores them, checked before anything is replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nanochat.checkpoint import CheckpointError, META_FILE, MODEL_FILE, list_steps, newest_tag, stage_dir, step_dir_name, verify
from nanochat.fileio import atomic_write
from nanochat.gpt import GPTConfig
from sharing.hf_folders import build_folder
from sharing.hf_share import EXIT_NOTHING, NATIVE_DIR, NATIVE_TOKENIZER_DIR, PIPELINE, REPO_ID_RE, SHARE_KEY, ShareError
from nanochat.stages import STAGES
from nanochat.tokenizer import Tokenizer, TokenizerError, default_tokenizer_dir


def fetch_shared(source: str) -> Path:
    """A local folder as it is; a Hub repo id is downloaded (only the nanochat/ files, which are all we install)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not REPO_ID_RE.match(source):
        raise ShareError(f"{source!r} is neither a folder nor a Hub repo id like USER/nanochat-d20-sft", EXIT_NOTHING)
    from huggingface_hub import snapshot_download

    # the hub raises its own HTTP errors and its HTTP library's network errors, with no common base
    try:
        return Path(snapshot_download(repo_id=source, allow_patterns=[f"{NATIVE_DIR}/*"]))
    except Exception as exc:
        raise ShareError(f"could not download {source}: {exc}") from None


def read_shared_checkpoint(native: Path) -> dict:
    """meta.json of a shared checkpoint, after checking the weights against it."""
    try:
        meta = verify(native, [MODEL_FILE])
        GPTConfig.from_dict(meta["model_config"])
    except CheckpointError as exc:
        raise ShareError(f"not a usable nanochat checkpoint: {exc}", EXIT_NOTHING) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ShareError(f"{native / META_FILE} has no model config this code can build: {exc}", EXIT_NOTHING) from None
    return meta


def read_shared_tokenizer(native: Path, vocab_size: int) -> Tokenizer:
    try:
        tokenizer = Tokenizer.load(native / NATIVE_TOKENIZER_DIR)
    except TokenizerError as exc:
        raise ShareError(str(exc), EXIT_NOTHING) from None
    if tokenizer.get_vocab_size() != vocab_size:
        raise ShareError(f"the shared tokenizer has {tokenizer.get_vocab_size():,} tokens, the model {vocab_size:,}", EXIT_NOTHING)
    return tokenizer


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return a.get_pattern() == b.get_pattern() and a.get_mergeable_ranks() == b.get_mergeable_ranks()


def tokenizer_needs_install(shared: Tokenizer, force: bool) -> bool:
    """Whether to write the shared tokenizer; refuses to replace a different one without force."""
    home = default_tokenizer_dir()
    if not home.is_dir() or not any(home.iterdir()):
        return True
    try:
        if same_tokenizer(Tokenizer.load(home), shared):
            return False
        problem = "holds a different tokenizer"
    except TokenizerError:
        problem = "holds an unreadable tokenizer"
    if not force:
        raise ShareError(
            f"{home} {problem}; models trained with it would read the shared tokenizer's ids wrongly. "
            "Use another NANOCHAT_BASE_DIR for the shared model, or --force to replace it"
        )
    return True


def checkpoint_needs_install(target: Path, meta: dict, force: bool) -> bool:
    """Whether to write the checkpoint; refuses to replace a different one at the same place without force."""
    if not target.exists():
        return True
    try:
        installed = verify(target, [MODEL_FILE])["files"][MODEL_FILE]["sha256"]
    except CheckpointError:
        installed = None
    if installed == meta["files"][MODEL_FILE]["sha256"]:
        return False
    if not force:
        raise ShareError(f"{target} already holds a different checkpoint; --force replaces it (or pick --model-tag)")
    return True


def install_shared(source: str, stage: str | None = None, model_tag: str | None = None, force: bool = False) -> tuple[str, str, int]:
    """Install a shared repo's (or local folder's) checkpoint and tokenizer; returns (stage, tag, step).

    Both conflicts are checked before anything is written, so a refusal changes nothing.
    """
    native = fetch_shared(source) / NATIVE_DIR
    if not native.is_dir():
        raise ShareError(f"{source} has no {NATIVE_DIR}/ folder: it was not prepared by hf_prepare", EXIT_NOTHING)
    meta = read_shared_checkpoint(native)
    share = meta.get(SHARE_KEY, {})
    stage = stage or share.get("stage")
    if stage not in STAGES:
        raise ShareError(f"{source} does not say which stage it is; pass --stage ({', '.join(PIPELINE)})", EXIT_NOTHING)
    model_tag = model_tag or share.get("model_tag") or "shared"
    step = meta["step"]
    target = stage_dir(stage) / model_tag / step_dir_name(step)
    tokenizer = read_shared_tokenizer(native, meta["model_config"]["vocab_size"])
    write_tokenizer = tokenizer_needs_install(tokenizer, force)
    write_checkpoint = checkpoint_needs_install(target, meta, force)
    if write_tokenizer:
        tokenizer.save(default_tokenizer_dir())
        print(f"tokenizer -> {default_tokenizer_dir()}")
    if write_checkpoint:
        target.parent.mkdir(parents=True, exist_ok=True)
        build_folder(target, lambda folder: copy_checkpoint(native, folder, meta))
        print(f"{stage} checkpoint -> {target}")
    else:
        print(f"{stage} checkpoint already installed at {target}")
    return stage, model_tag, step


def copy_checkpoint(native: Path, folder: Path, meta: dict) -> None:
    shutil.copyfile(native / MODEL_FILE, folder / MODEL_FILE)
    atomic_write(folder / META_FILE, json.dumps(meta, indent=2) + "\n")


def chat_command(stage: str, model_tag: str, step: int) -> str:
    """The chat_cli command that talks to this checkpoint: the short one when it is what chat_cli picks anyway."""
    folder = stage_dir(stage)
    if newest_tag(folder) == model_tag and list_steps(folder / model_tag)[-1] == step:
        return f"./chat_cli.sh -s {stage}"
    return f"./chat_cli.sh -s {stage} --model-tag {model_tag} --step {step}"
