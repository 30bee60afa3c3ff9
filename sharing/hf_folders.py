"""Prepare upload folders of trained models (sharing.hf_share describes them), each written aside and
renamed into place, so a folder is either complete or absent."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from nanochat.checkpoint import CheckpointError, META_FILE, MODEL_FILE, load_model, stage_dir, step_dir_name
from nanochat.common import get_base_dir
from nanochat.fileio import atomic_write
from sharing.hf_export import CHAT_TEMPLATE, export_hf
from sharing.hf_share import CARD_FILE, EXIT_NOTHING, NATIVE_DIR, NATIVE_TOKENIZER_DIR, PIPELINE, SHARE_KEY, ShareError, SharedModel, repo_name
from sharing.model_card import model_card
from nanochat.report import load_all_metrics, section_slugs
from nanochat.tokenizer import Tokenizer, TokenizerError, default_tokenizer_dir, get_tokenizer


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`; an old `final` is deleted only once the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def build_folder(final: Path, fill) -> Path:
    """Call fill(tmp) on a fresh hidden sibling folder, then swap it in; a failure leaves `final` untouched."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prepare_all(author: str, stages: tuple[str, ...], out_dir: Path, code_url: str | None = None) -> list[Path]:
    """A folder per requested stage that has a checkpoint; ShareError (exit 2) when none has one."""
    tokenizer = load_home_tokenizer()
    metrics = report_metrics()
    shared: dict[str, SharedModel] = {}
    folders, skipped = [], []
    for stage in stages:
        try:
            model, meta = load_model(stage)
        except CheckpointError as exc:
            print(f"skipping {stage}: {exc}")
            skipped.append(str(exc))
            continue
        shared[stage] = to_shared_model(model, meta, author, shared)
        folders.append(prepare_stage(shared[stage], model, tokenizer, out_dir, metrics, code_url))
        print(f"{stage}: {meta['model_tag']} step {meta['step']:,} -> {folders[-1]}")
        del model  # the next stage's weights need the memory
    if not folders:
        raise ShareError("nothing to share: " + "; ".join(skipped), EXIT_NOTHING)
    return folders


def load_home_tokenizer() -> Tokenizer:
    try:
        return get_tokenizer()
    except TokenizerError as exc:
        raise ShareError(str(exc), EXIT_NOTHING) from None


def to_shared_model(model, meta: dict, author: str, shared: dict[str, SharedModel]) -> SharedModel:
    stage, tag = meta["source"], meta["model_tag"]
    return SharedModel(
        stage=stage, model_tag=tag, step=meta["step"], repo_id=f"{author}/{repo_name(tag, stage)}",
        base_model=lineage(meta, shared), config=model.config, num_params=model.num_params(), meta=meta,
    )


def lineage(meta: dict, shared: dict[str, SharedModel]) -> str | None:
    """Repo id of the model this stage started from, if it is shared in the same run.

    Post-training checkpoints record where they started ("started_from"); a
    shared predecessor of another tag is a different model, so it does not count.
    """
    started = meta.get("started_from")
    if started:
        parent = shared.get(started.get("source"))
        return parent.repo_id if parent and parent.model_tag == started.get("model_tag") else None
    position = PIPELINE.index(meta["source"])
    parent = shared.get(PIPELINE[position - 1]) if position > 0 else None
    return parent.repo_id if parent else None


def prepare_stage(shared: SharedModel, model, tokenizer: Tokenizer, out_dir: Path, metrics: dict, code_url: str | None) -> Path:
    """Write one ready-to-upload folder (replacing an older one of the same name)."""
    if model.config.vocab_size != tokenizer.get_vocab_size():
        raise ShareError(
            f"the {shared.stage} model has a {model.config.vocab_size:,}-token vocabulary but the tokenizer in "
            f"{default_tokenizer_dir()} has {tokenizer.get_vocab_size():,}: it was trained with another tokenizer"
        )
    checkpoint = stage_dir(shared.stage) / shared.model_tag / step_dir_name(shared.step)

    def fill(folder: Path) -> None:
        export_hf(model, tokenizer, folder, chat_template=CHAT_TEMPLATE)
        write_native_files(folder / NATIVE_DIR, checkpoint, tokenizer, shared)
        atomic_write(folder / CARD_FILE, model_card(shared, metrics, code_url))

    out_dir.mkdir(parents=True, exist_ok=True)
    return build_folder(out_dir / shared.repo_id.split("/")[1], fill)


def write_native_files(native: Path, checkpoint: Path, tokenizer: Tokenizer, shared: SharedModel) -> None:
    """The checkpoint's weights and meta.json (listing only the weights) and our tokenizer files."""
    native.mkdir(parents=True)
    shutil.copyfile(checkpoint / MODEL_FILE, native / MODEL_FILE)
    meta = json.loads((checkpoint / META_FILE).read_text(encoding="utf-8"))
    # optimizer and data-loader state stay home: they are large and only resume training
    meta["files"] = {MODEL_FILE: meta["files"][MODEL_FILE]}
    meta[SHARE_KEY] = {"stage": shared.stage, "model_tag": shared.model_tag, "step": shared.step, "repo_id": shared.repo_id}
    atomic_write(native / META_FILE, json.dumps(meta, indent=2) + "\n")
    tokenizer.save(native / NATIVE_TOKENIZER_DIR)


def report_metrics() -> dict[str, dict]:
    """Numbers of every report section (sidecars); unreadable ones are left out with a warning."""
    directory = get_base_dir() / "report"
    if not directory.is_dir():
        return {}
    metrics, problems = load_all_metrics(directory, section_slugs(directory))
    for problem in problems:
        print(f"warning: {problem} (left out of the model card)", file=sys.stderr)
    return metrics
