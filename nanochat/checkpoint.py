"""Checkpoints that survive crashes: written aside, verified, renamed into place.

Layout of one checkpoint, `<stage dir>/<model tag>/step_000123/`:
    model.safetensors     weights (no pickle: safe to load from strangers)
    optim_rank{r}.pt      rank r's optimizer state (sharded optimizers keep state per rank)
    data_rank{r}.json     rank r's data-loader state
    meta.json             written last: step, model config, metrics, world size,
                          and the size and sha256 of every file above

Everything is written into a hidden `.step_000123.tmp` folder first and renamed
when complete, so a crash at any instant leaves the previous checkpoint intact.
Loading checks sizes and hashes and falls back to the previous checkpoint
(with a warning naming what is wrong) when the newest one is broken.
One rank writes each copy, found at run time (find_writers), not configured:
on one filesystem shared by every rank (a shared home folder), global rank 0
writes for all; on machines with disks of their own, the lowest rank of each
machine writes that machine's copy, which holds the weights and the files of
its own ranks. Resuming, the ranks agree first (agreed_step): every rank
continues the same step, the newest that every rank can load, or they all stop
with one error naming which rank lacks what.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from nanochat.download import file_sha256
from nanochat.stages import AUTO_ORDER, STAGES

log = logging.getLogger("nanochat.checkpoint")

STEP_RE = re.compile(r"^step_(\d{6,})$")
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message says what was looked for where."""


T = TypeVar("T")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_steps(tag_dir: Path) -> list[int]:
    """Steps of complete-looking checkpoints in `tag_dir`, oldest first."""
    if not tag_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in tag_dir.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir())


def optim_file(rank: int) -> str:
    return f"optim_rank{rank}.pt"


def data_file(rank: int) -> str:
    return f"data_rank{rank}.json"


# ---------------------------------------------------------------- ranks together


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order (a collective: every rank calls it)."""
    if not _dist_on():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def agree(work: Callable[[], T]) -> T:
    """work() on every rank; when it raised CheckpointError on any rank, every rank raises one
    naming each rank's problem, so no rank goes on to a collective the others never reach."""
    try:
        mine, problem = work(), None
    except CheckpointError as exc:
        mine, problem = None, str(exc)
    problems = gather(problem)
    if any(problems):
        raise CheckpointError(_by_rank(problems) if len(problems) > 1 else problems[0])
    return mine


def _by_rank(problems: list[str | None]) -> str:
    """'rank 1: X; ranks 2, 3: Y': each distinct problem once, with the ranks that have it."""
    ranks: dict[str, list[int]] = {}
    for rank, problem in enumerate(problems):
        if problem:
            ranks.setdefault(problem, []).append(rank)
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {problem}" for problem, rs in ranks.items())


@dataclass(frozen=True)
class Writers:
    """Which rank writes the copy that each rank reads and writes its own files into."""

    of: tuple[int, ...]  # of[r]: the rank that writes rank r's copy
    rank: int

    @property
    def me(self) -> bool:
        return self.of[self.rank] == self.rank

    def served(self) -> set[int]:
        """The ranks whose files go into the copy this rank writes."""
        return {r for r, writer in enumerate(self.of) if writer == self.rank}


def find_writers(folder: Path) -> Writers:
    """Who writes in `folder`, found by looking (every rank calls it): each rank leaves a marker file with
    a random name there; once all have, each rank opens every rank's marker by name; the lowest rank whose
    marker it can read shares its filesystem and writes for it. One filesystem for all: rank 0 writes; a
    disk per machine: each machine's lowest rank. Random names, never looked up before, so a network
    filesystem cannot answer from a cache; opened rather than listed, for close-to-open consistency."""
    folder = Path(folder)
    if not _dist_on():
        return Writers((0,), 0)
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    marker = folder / f".writer-{token}"
    marker.write_text(token)
    tokens = gather(token)  # returns once every rank has written its marker
    try:
        writer = min(r for r, t in enumerate(tokens) if _reads(folder / f".writer-{t}", t))
        writers = gather(writer)  # returns once every rank has looked
    finally:
        marker.unlink(missing_ok=True)
    if any(writers[w] != w for w in writers):
        raise CheckpointError(f"the ranks see {folder} inconsistently (the writer of each rank's copy: {writers}): "
                              "give every rank of a machine the same $NANOCHAT_BASE_DIR")
    return Writers(tuple(writers), dist.get_rank())


def _reads(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except OSError:
        return False


# ---------------------------------------------------------------- saving


def _write_synced(path: Path, writer) -> None:
    writer(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    tag_dir: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optim_state: list[dict] | None,
    data_state: dict | None,
    meta: dict,
    keep_last: int | None = None,
) -> Path:
    """Write one checkpoint (call on every rank, in or out of a process group); returns its folder.
    Each rank writes its own optimizer and data files into the copy of its writer (find_writers)."""
    tag_dir = Path(tag_dir)
    final = tag_dir / step_dir_name(step)
    tmp = tag_dir / f".{final.name}.tmp"
    writers = find_writers(tag_dir.parent)
    if writers.me:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    rank = _rank()
    mine = _write_rank_files(tmp, rank, optim_state, data_state)
    if writers.me:
        _write_synced(tmp / MODEL_FILE, lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(p)))
    tables = gather(mine)
    if writers.me:
        files = {name: info for r in sorted(writers.served()) for name, info in tables[r].items()}
        files[MODEL_FILE] = _describe(tmp / MODEL_FILE)
        full_meta = {**meta, "step": step, "world_size": len(writers.of), "files": files}
        _write_synced(tmp / META_FILE, lambda p: p.write_text(json.dumps(full_meta, indent=2)))
        _replace_dir(tmp, final)
        if keep_last:
            prune(tag_dir, keep_last)
    _barrier()
    return final


def _write_rank_files(tmp: Path, rank: int, optim_state, data_state) -> dict[str, dict]:
    written = {}
    if optim_state is not None:
        _write_synced(tmp / optim_file(rank), lambda p: torch.save(optim_state, p))
        written[optim_file(rank)] = _describe(tmp / optim_file(rank))
    if data_state is not None:
        _write_synced(tmp / data_file(rank), lambda p: p.write_text(json.dumps(data_state)))
        written[data_file(rank)] = _describe(tmp / data_file(rank))
    return written


def _describe(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap `tmp` in as `final`; an existing `final` (same step saved again) goes only after."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)


def prune(tag_dir: Path, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` checkpoints; returns the steps removed."""
    steps = list_steps(tag_dir)
    doomed = steps[: max(0, len(steps) - keep_last)]
    for step in doomed:
        shutil.rmtree(tag_dir / step_dir_name(step), ignore_errors=True)
    return doomed


# ---------------------------------------------------------------- loading


@dataclass
class Checkpoint:
    step: int
    path: Path
    meta: dict
    model_state: dict[str, torch.Tensor]
    optim_state: list[dict] | None = None
    data_state: dict | None = None
    extra: dict = field(default_factory=dict)


def verify(path: Path, needed: list[str]) -> dict:
    """Return meta.json of the checkpoint at `path`, or raise CheckpointError saying what is wrong."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {META_FILE} (half-written checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}/{META_FILE} is corrupt: {exc}") from None
    files = meta.get("files", {})
    for name in needed:
        if name not in files:
            raise CheckpointError(f"{path}: {name} is not part of this checkpoint")
        target = path / name
        if not target.exists():
            raise CheckpointError(f"{path}: {name} is missing")
        if target.stat().st_size != files[name]["size"] or file_sha256(target) != files[name]["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its recorded size/checksum (corrupt)")
    return meta


def _needed(rank: int, with_training_state: bool) -> list[str]:
    return [MODEL_FILE] + ([optim_file(rank), data_file(rank)] if with_training_state else [])


def newest_usable_step(tag_dir: Path, *, rank: int = 0, with_training_state: bool = True) -> int:
    """The newest step in `tag_dir` whose files (this rank's, with `with_training_state`) check out; a broken
    one is skipped with a warning naming what is wrong. CheckpointError when there is none."""
    tag_dir = Path(tag_dir)
    steps = list(reversed(list_steps(tag_dir)))
    if not steps:
        raise CheckpointError(f"no checkpoint found in {tag_dir}")
    problems = []
    for step in steps:
        try:
            verify(tag_dir / step_dir_name(step), _needed(rank, with_training_state))
            return step
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("skipping broken checkpoint: %s", exc)
    raise CheckpointError(f"no usable checkpoint in {tag_dir}: " + "; ".join(problems))


def agreed_step(tag_dir: Path, rank: int) -> int:
    """The step every rank resumes (a collective): the oldest of the ranks' newest usable steps, so a rank
    whose newest copy is broken or missing takes the others back with it instead of training apart."""
    steps = gather(agree(lambda: newest_usable_step(tag_dir, rank=rank)))
    if len(set(steps)) > 1:
        log.warning("the ranks' newest usable checkpoints differ (%s); every rank resumes step %d",
                    ", ".join(f"rank {r}: {s}" for r, s in enumerate(steps)), min(steps))
    return min(steps)


def load_checkpoint(
    tag_dir: Path, step: int | None = None, *, rank: int = 0, with_training_state: bool = True, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Load the newest usable checkpoint in `tag_dir` (or exactly `step`).

    With `with_training_state`, this rank's optimizer and data-loader files
    are required too (resuming); without, only the weights (inference).
    """
    tag_dir = Path(tag_dir)
    if step is None:
        step = newest_usable_step(tag_dir, rank=rank, with_training_state=with_training_state)
    path = tag_dir / step_dir_name(step)
    meta = verify(path, _needed(rank, with_training_state))
    ckpt = Checkpoint(step, path, meta, load_file(str(path / MODEL_FILE), device=str(device)))
    if with_training_state:
        ckpt.optim_state = torch.load(path / optim_file(rank), map_location=device, weights_only=True)
        ckpt.data_state = json.loads((path / data_file(rank)).read_text())
    return ckpt


# ---------------------------------------------------------------- models by stage

def stage_dir(source: str) -> Path:
    """A stage's checkpoint folder (nanochat.stages names them)."""
    from nanochat.common import get_base_dir

    if source not in STAGES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(STAGES)} or auto")
    return get_base_dir() / STAGES[source].folder


def newest_tag(folder: Path) -> str | None:
    """The model tag whose newest checkpoint was written last."""
    best, best_time = None, -1.0
    for tag in (p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else ():
        steps = list_steps(tag)
        if steps:
            mtime = (tag / step_dir_name(steps[-1])).stat().st_mtime
            if mtime > best_time:
                best, best_time = tag.name, mtime
    return best


def resolve_source(source: str = "auto") -> str:
    """`auto` picks the most advanced stage that has a checkpoint (nanochat.stages.AUTO_ORDER)."""
    if source != "auto":
        return source
    for candidate in AUTO_ORDER:
        if newest_tag(stage_dir(candidate)) is not None:
            return candidate
    raise CheckpointError(
        "no model found: looked for checkpoints in " + ", ".join(str(stage_dir(s)) for s in AUTO_ORDER)
        + "; train one with ./pretrain.sh"
    )


def load_model(source: str = "auto", model_tag: str | None = None, step: int | None = None, *, device="cpu", dtype: torch.dtype | None = None):
    """(GPT in eval mode, checkpoint metadata) for a stage's newest (or given) tag and step. Under torchrun
    (every rank calls it) rank 0's choice of stage, tag and step is every rank's, so no node starts from
    another model because its own copy's newest differs; a rank that cannot load it stops them all."""
    from nanochat.gpt import GPTConfig, build_model

    source, tag, step = gather(agree(lambda: _choose_model(source, model_tag, step)))[0]
    script = STAGES[source].script

    def load() -> Checkpoint:
        try:
            return load_checkpoint(stage_dir(source) / tag, step, with_training_state=False, device=device)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; {script} makes a new one") from None

    ckpt = agree(load)
    model = build_model(GPTConfig.from_dict(ckpt.meta["model_config"]), device)
    model.load_state_dict(ckpt.model_state)
    if dtype is not None:  # weights in the dtype the model then computes in (serving, evaluation)
        model.to(dtype=dtype)
        model.compute_dtype = dtype
    model.eval()
    return model, {**ckpt.meta, "source": source, "model_tag": tag, "step": ckpt.step}


def _choose_model(source: str, model_tag: str | None, step: int | None) -> tuple[str, str, int]:
    """(stage, tag, step) of the model load_model means, as this rank's files answer."""
    source = resolve_source(source)
    folder = stage_dir(source)
    tag = model_tag or newest_tag(folder)
    script = STAGES[source].script
    if tag is None or not (folder / tag).is_dir():
        wanted = f"{folder}/{tag}" if tag else f"{folder}/<tag>/step_*"
        raise CheckpointError(f"no {source} checkpoint: looked for {wanted}; {script} makes one")
    if step is None:
        try:
            step = newest_usable_step(folder / tag, with_training_state=False)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; {script} makes a new one") from None
    return source, tag, step
