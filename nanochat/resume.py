"""Whether a training stage continues a run or starts one, so restarting after a crash never silently starts over.

The modes, chosen by every training stage's flags (add_resume_args):
- auto (no flag): continue from the tag's newest checkpoint when it has one and
  it was made with the same model and batch settings, saying so in one line;
  start at step 0 when it has none; refuse, naming what differs, when it does
  not match (then --fresh starts over, or the old flags continue). A
  post-training run also matches only when it started from the same model
  (stage, tag and step): after a new midtraining, SFT does not continue the
  run it made from the old one.
- resume (--resume): the same, but no checkpoint to continue is an error.
- fresh (--fresh): move the tag's folder aside (<tag>.old-<time>, nothing is
  deleted; on machines with disks of their own, each machine's copy) and start at step 0.

Under torchrun every rank decides alike: a rank that finds no checkpoint where
another continues one, or a mismatch, stops every rank with one error.

A continued run keeps the device batch it was running with unless one is
given, so re-measuring memory cannot change the run's shape halfway.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from nanochat.checkpoint import META_FILE, CheckpointError, agree, find_writers, gather, list_steps, step_dir_name
from nanochat.common import print0

MODES = ("auto", "resume", "fresh")
# saved args that must match for the checkpoint to continue this run (the model config is compared whole)
MATCHING_ARGS = ("total_batch_size", "max_seq_len", "packing", "orthogonalizer", "normuon", "weight_decay", "cautious_weight_decay")


def add_resume_args(group) -> None:
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--resume", dest="resume_mode", action="store_const", const="resume", default="auto",
                      help="continue from the newest complete checkpoint, an error when there is none "
                           "(default: continue when there is one that matches, else start)")
    mode.add_argument("--fresh", dest="resume_mode", action="store_const", const="fresh",
                      help="start at step 0, moving the old run aside (<tag>.old-<time>)")


def newest_meta(tag_dir: Path) -> dict | None:
    """meta.json of the newest step folder that has a readable one (full checks happen when it is loaded)."""
    for step in reversed(list_steps(tag_dir)):
        try:
            return json.loads((tag_dir / step_dir_name(step) / META_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            continue
    return None


def mismatches(meta: dict, model_config: dict, settings: dict, started_from: dict | None = None) -> list[str]:
    """What differs between a saved run and this one, as 'name: saved -> now' lines."""
    saved_config, saved_args = meta.get("model_config", {}), meta.get("args", {})
    if started_from is not None and meta.get("started_from") != started_from:
        found = [f"started from: {_model_name(meta.get('started_from'))} -> {_model_name(started_from)}"]
    else:
        found = []
    found += [f"model {key}: {saved_config.get(key)} -> {value}" for key, value in model_config.items()
              if saved_config.get(key) != value]
    found += [f"--{key.replace('_', '-')}: {saved_args[key]} -> {settings[key]}" for key in MATCHING_ARGS
              if key in saved_args and settings.get(key) is not None and saved_args[key] != settings[key]]
    return found


def move_aside(tag_dir: Path) -> Path | None:
    """Rename the tag's folder out of the way (every rank calls it): the writer of each copy of the run
    (nanochat.checkpoint.find_writers) renames its copy, under rank 0's time, so the nodes' copies keep one
    name, and says so (each machine's log then tells its own copy's fate); every rank waits for the renames,
    so none looks before its writer has renamed. The new name, or None where no copy had a run."""
    writers = find_writers(tag_dir.parent)
    aside = tag_dir.with_name(f"{tag_dir.name}.old-{gather(time.strftime('%Y%m%d-%H%M%S'))[0]}")
    moved = writers.me and tag_dir.is_dir() and any(tag_dir.iterdir())
    if moved:
        tag_dir.rename(aside)
        print(f"--fresh: moved the old run aside to {aside}; starting at step 0", flush=True)
    had_run = gather(moved)
    _barrier()
    return aside if any(had_run) else None


def decide(tag_dir: Path, mode: str, model_config: dict, settings: dict, started_from: dict | None = None) -> dict | None:
    """The saved meta of the checkpoint to continue from, or None to start at step 0 (after --fresh's move).
    settings: this run's flag values, as its checkpoints record them ("args"). started_from: for a stage that continues another's model, {source, model_tag, step} of that model.
    Every rank calls it and every rank gets the same answer: all continue, all start, or all raise."""
    if mode not in MODES:
        raise ValueError(f"unknown resume mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "fresh":
        move_aside(tag_dir)
        return None
    meta = agree(lambda: _continuable(tag_dir, mode, model_config, settings, started_from))
    steps = gather(meta and meta.get("step"))
    if None in steps and any(s is not None for s in steps):
        lacking = [r for r, s in enumerate(steps) if s is None]
        raise CheckpointError(
            f"rank(s) {', '.join(map(str, lacking))} find no checkpoint in {tag_dir} where the others continue one: "
            "a machine with its own disk needs its own copy of the run's folder (copy it there), or --fresh starts over"
        )
    if meta is not None and mode == "auto":
        print0(f"continuing the run in {tag_dir} (--fresh starts over)")
    return meta


def _continuable(tag_dir: Path, mode: str, model_config: dict, settings: dict, started_from: dict | None) -> dict | None:
    """This rank's answer: the newest saved meta when it matches this run, None when there is none."""
    meta = newest_meta(tag_dir) if tag_dir.is_dir() else None
    if meta is None:
        if mode == "resume":
            raise CheckpointError(f"--resume: no checkpoint in {tag_dir} to continue")
        return None
    differences = mismatches(meta, model_config, settings, started_from)
    if differences:
        raise CheckpointError(
            f"{tag_dir} holds a run made with other settings ({'; '.join(differences)}): run with its settings "
            "to continue it, or --fresh to move it aside and start over"
        )
    return meta


def _model_name(started_from: dict | None) -> str:
    if not started_from:
        return "unknown"
    return f"{started_from.get('source')} {started_from.get('model_tag')} step {started_from.get('step')}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
