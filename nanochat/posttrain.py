"""The pieces a post-training stage calls by name as its script tells its story (scripts.mid_train,
scripts.chat_sft, scripts.chat_rl): the flags they share, the model a stage continues, the optimizer
step's accumulation, optimizers and resume, the validation hook, the one training loop, the report.

Every function takes values; each stage's main() owns its flags and passes them on.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nanochat.checkpoint import load_model, stage_dir
from nanochat.common import DistInfo, add_device_arg, print0, setup_logging
from nanochat.energy import add_cost_args
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import add_lr_args, build_optimizers
from nanochat.report import write_section
from nanochat.resume import add_resume_args, decide as decide_resume
from nanochat.runtime import ComputeSettings, add_compute_args, add_memory_args, prepare_model, set_compute_dtype
from nanochat.schedule import WARMDOWN_RATIO, PlanError
from nanochat.stages import get_stage
from nanochat.tracking import Tracker, add_run_arg
from nanochat.training import Hooks, LoopSettings, Resumed, TrainLoop, add_checkpoint_args, resume_from, run_guarded


# ---------------------------------------------------------------- flags


def add_stage_args(p: argparse.ArgumentParser, stage: str, *, device_batch: int, init_lr_frac: float) -> None:
    """The flags of a stage that trains on a conversation mixture (midtraining, SFT)."""
    add_start_args(p, stage, device_batch)
    g = p.add_argument_group("batch and horizon")
    g.add_argument("--max-seq-len", type=int, default=None, help="row length in tokens (default: the model's context)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (default: derived from --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the training mixture (default %(default)s)")
    g.add_argument("--max-examples", type=int, default=None, help="use only the first N examples of the (shuffled) mixture")
    g = p.add_argument_group("optimization")
    add_lr_args(g, init_lr_frac)
    g.add_argument("--warmdown-ratio", type=float, default=WARMDOWN_RATIO, help="fraction of steps over which the lr decays to 0 (default %(default)s)")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=150, help="validation every N steps; 0 for only at the end (default %(default)s)")
    g.add_argument("--eval-steps", type=int, default=20, help="validation batches per evaluation (default %(default)s)")
    add_run_args(g, save_every=500)


def depth_tag(depth: str) -> str:
    """-d N: the model tag the original nanochat gives a model of depth N."""
    return f"d{int(depth)}"


def add_start_args(p: argparse.ArgumentParser, stage: str, device_batch: int) -> None:
    """Which model a stage continues, and its device batch; the stage script's launch flag in the epilog."""
    p.epilog = (f"{get_stage(stage).script} passes its flags on to this, except --gpus N: the processes (GPUs) it "
                "launches with torchrun (default: every visible GPU, 1 without one).")
    g = p.add_argument_group("model and output")
    g.add_argument("--source", default=None, help=f"stage to start from (default: {get_stage(stage).starts_from})")
    tag = g.add_mutually_exclusive_group()
    tag.add_argument("--model-tag", default=None, help="model tag to start from (default: the newest); also the output tag")
    tag.add_argument("-d", "--depth", dest="model_tag", type=depth_tag, metavar="N", help="the model of depth N: --model-tag dN")
    g.add_argument("--step", type=int, default=None, help="checkpoint step to start from (default: the newest)")
    g.add_argument("-b", "--batch-size", "--device-batch-size", dest="device_batch_size", type=int, default=None, metavar="N",
                   help=f"rows per forward pass per GPU (default: {device_batch}, or the largest power of two below it "
                        "whose measured step fits in memory)")


def add_run_args(group, *, save_every: int) -> None:
    """Checkpoints, resume, wandb, the final chat evaluation, cost figures and device: every post-training stage's."""
    add_checkpoint_args(group, save_every=save_every, keep_last=2)
    add_resume_args(group)
    add_run_arg(group)
    group.add_argument("--no-eval", action="store_true", help="skip the chat evaluation at the end")
    group.add_argument("--eval-problems", type=int, default=None, help="problems per task in that evaluation (default: all)")
    add_cost_args(group)
    add_device_arg(group)
    add_compute_args(group)
    add_memory_args(group)


# ---------------------------------------------------------------- the pieces, in a stage's order


@dataclass
class Start:
    """A post-training stage set up to train: the model it continues, where it writes, its optimizers."""

    stage: str
    model: object
    meta: dict  # the checkpoint metadata of the model it starts from
    tag_dir: Path
    memory_estimate: int | None = None  # bytes, of the fitted device batch's step
    optimizers: list | None = None
    resumed: Resumed | None = None
    step_model: object = None

    def origin(self) -> dict:
        """The model this run continues, as its checkpoints record it."""
        return {k: self.meta[k] for k in ("source", "model_tag", "step")}

    def started_from(self) -> str:
        return f"{self.meta['source']} {self.meta['model_tag']} step {self.meta['step']}"


def load_start(stage: str, source: str | None, model_tag: str | None, step: int | None, info: DistInfo,
               dtype: str | None) -> Start:
    """The model a stage continues (`source`, else the stage it starts from), in training mode and the compute dtype."""
    model, meta = load_model(source or get_stage(stage).starts_from, model_tag, step, device=info.device)
    model.train()
    set_compute_dtype(model, dtype, info.device)
    return Start(stage, model, meta, stage_dir(stage) / meta["model_tag"])


def accumulation_steps(rows_per_step: int, device_batch: int, world_size: int) -> int:
    """Forward passes per optimizer step on each rank."""
    per_pass = device_batch * world_size
    if rows_per_step % per_pass:
        raise PlanError(f"rows per step ({rows_per_step}) must be a multiple of device batch x ranks ({per_pass})")
    return rows_per_step // per_pass


def prepare_training(start: Start, info: DistInfo, steps: int, *, rates: dict, resume_mode: str, settings: dict,
                     compute: ComputeSettings) -> Start:
    """Optimizers at the stage's learning rates, the stage's own checkpoint loaded when resume_mode says so
    (nanochat.resume, comparing the run's `settings` with the saved ones), the model to step."""
    start.optimizers = build_optimizers(start.model, **rates, world_size=info.world_size)
    continuing = decide_resume(start.tag_dir, resume_mode, start.model.config.to_dict(), settings, start.origin())
    start.resumed = resume_from(start.tag_dir, start.model, start.optimizers, info) if continuing else Resumed()
    start.step_model = prepare_model(start.model, compute, info.device, steps)
    return start


def validation(start: Start, batches: Callable[[], object], steps: int, token_bytes) -> Callable[[int], dict]:
    """The evaluation hook: validation bits per byte over `steps` batches of a fresh batches()."""

    def validate(step: int) -> dict:
        bpb = evaluate_bpb(start.step_model, batches(), steps, token_bytes)
        print0(f"step {step:06d} | validation bits per byte: {bpb:.4f}")
        return {"val_bpb": bpb}

    return validate


def train_stage(start: Start, info: DistInfo, batches, settings: LoopSettings, hooks: Hooks, *, run: str | None,
                flags: dict, loss_fn=None) -> tuple[int, TrainLoop]:
    """Run the one training loop (checkpoints, resume, wandb run `run`; `flags` recorded with each checkpoint);
    (exit code, the loop)."""
    meta = {"model_config": start.model.config.to_dict(), "args": flags, "started_from": start.origin()}
    tracker = Tracker(run, {"args": flags, "stage": start.stage}, info.is_master)
    loop = TrainLoop(model=start.model, step_model=start.step_model, optimizers=start.optimizers, batches=batches, settings=settings,
                     info=info, tag_dir=start.tag_dir, meta=meta, hooks=hooks, tracker=tracker, resumed=start.resumed,
                     loss_fn=loss_fn, memory_estimate=start.memory_estimate)
    try:
        return loop.run(), loop
    finally:
        tracker.finish()


def report_stage(start: Start, items: dict, loop: TrainLoop, t0: float) -> None:
    stage = get_stage(start.stage)
    write_section(stage.train_section, stage.title, {"started from": start.started_from(), **items,
                                                     "wall time (s)": round(time.time() - t0, 1), **loop.energy_items()})

