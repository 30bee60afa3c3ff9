"""What the post-training stages share: flags, loading the previous stage, the loop, the report.

A stage is described by a `StageSpec` (which stage it is, how it batches, which
mixtures it trains and validates on); `run_stage` does the rest with the same
loop, checkpoints and resume as pretraining. RL (scripts.chat_rl) trains on
rollouts instead of a mixture and uses the pieces: load_start, prepare_training,
train_stage and report_stage.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nanochat.checkpoint import CheckpointError, load_model, stage_dir
from nanochat.common import DataError, DistInfo, add_device_arg, compute_cleanup, compute_init, print0, setup_logging
from nanochat.energy import add_cost_args
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import add_lr_args, build_optimizers, learning_rates
from nanochat.report import write_section
from nanochat.resume import add_resume_args, decide as decide_resume
from nanochat.runtime import MemoryRefusal, add_compute_args, add_memory_args, fit_device_batch, prepare_model, set_compute_dtype
from nanochat.schedule import WARMDOWN_RATIO, PlanError
from nanochat.stages import get_stage
from nanochat.tokenizer import TokenizerError, get_tokenizer
from nanochat.tracking import Tracker, add_run_arg
from nanochat.training import Hooks, LoopSettings, Resumed, TrainLoop, add_checkpoint_args, cost_settings, resume_from


@dataclass
class StageSpec:
    name: str  # "mid" or "sft": the stage (nanochat.stages) it writes, which names its title and predecessor
    batches: type  # PackedConversations or PaddedConversations
    train_mixture: Callable  # args -> task
    val_mixture: Callable  # args -> task
    steps_for: Callable  # (args, train_task, tokenizer, rows_per_step, seq_len) -> num_iterations
    rows_per_step: Callable  # (args, seq_len) -> rows per optimizer step across all ranks


def add_stage_args(p: argparse.ArgumentParser, *, device_batch: int, init_lr_frac: float) -> None:
    g = p.add_argument_group("model and output")
    g.add_argument("--source", default=None, help="stage to start from (default: this stage's usual predecessor)")
    g.add_argument("--model-tag", default=None, help="model tag to start from (default: the newest); also the output tag")
    g.add_argument("--step", type=int, default=None, help="checkpoint step to start from (default: the newest)")
    g = p.add_argument_group("batch and horizon")
    g.add_argument("--device-batch-size", type=int, default=None,
                   help=f"rows per forward pass per GPU (default: {device_batch}, or the largest power of two below it whose measured step fits in memory)")
    p.set_defaults(default_device_batch=device_batch)
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


def add_run_args(group, *, save_every: int) -> None:
    """Checkpoints, resume, wandb, the final chat evaluation, cost figures and device: every post-training stage's."""
    add_checkpoint_args(group, save_every=save_every, keep_last=2)
    add_resume_args(group)
    add_run_arg(group)
    add_final_eval_args(group)
    add_cost_args(group)
    add_device_arg(group)
    add_compute_args(group)
    add_memory_args(group)


def add_final_eval_args(group) -> None:
    group.add_argument("--no-eval", action="store_true", help="skip the chat evaluation at the end")
    group.add_argument("--eval-problems", type=int, default=None, help="problems per task in that evaluation (default: all)")


def stage_main(spec: StageSpec, args) -> int:
    """What a mid/SFT stage script's main() does before its final chat evaluation."""
    return guarded_main(lambda args, info: run_stage(spec, args, info), args)


def guarded_main(train: Callable, args) -> int:
    """Set up the device and process group, train(args, info), clean up; the exit code. Errors a user
    can act on (no checkpoint, tokenizer or data; sizes that do not fit) are one line and exit 2, a
    memory refusal exits 3; anything else is a bug and keeps its traceback."""
    setup_logging()
    info = compute_init(args.device)
    try:
        return train(args, info)
    except (CheckpointError, TokenizerError, FileNotFoundError, PlanError, DataError) as exc:
        print0(f"error: {exc}")
        return 2
    except MemoryRefusal as exc:
        print0(f"error: {exc}")
        return 3
    finally:
        compute_cleanup()


@dataclass
class Start:
    """A post-training stage set up to train: the model it continues, where it writes, its optimizers."""

    stage: str
    model: object
    meta: dict  # the checkpoint metadata of the model it starts from
    tag_dir: Path
    memory_estimate: int | None
    optimizers: list | None = None
    resumed: Resumed | None = None
    step_model: object = None

    def origin(self) -> dict:
        """The model this run continues, as its checkpoints record it."""
        return {k: self.meta[k] for k in ("source", "model_tag", "step")}

    def started_from(self) -> str:
        return f"{self.meta['source']} {self.meta['model_tag']} step {self.meta['step']}"


def load_start(stage: str, source: str | None, args, info: DistInfo, default_batch: int, seq_len: int | None) -> Start:
    """The model a stage continues (`source`, else the stage it starts from), in training mode and the
    compute dtype, with the device batch measured to fit rows of seq_len (the model's context if None)."""
    model, meta = load_model(source or get_stage(stage).starts_from, args.model_tag, args.step, device=info.device)
    model.train()
    set_compute_dtype(model, args, info.device)
    args.device_batch_size, estimate = fit_device_batch(model, args, default_batch, seq_len or model.config.sequence_len, info, stage)
    return Start(stage, model, meta, stage_dir(stage) / meta["model_tag"], estimate)


def prepare_training(start: Start, args, info: DistInfo, steps: int) -> Start:
    """Optimizers at the stage's learning rates, the stage's own checkpoint loaded with --resume, the model to step."""
    start.optimizers = build_optimizers(start.model, **learning_rates(args), world_size=info.world_size)
    continuing = decide_resume(start.tag_dir, args.resume_mode, start.model.config.to_dict(), vars(args), start.origin())
    start.resumed = resume_from(start.tag_dir, start.model, start.optimizers, info) if continuing else Resumed()
    start.step_model = prepare_model(start.model, args, info.device, steps)
    return start


def train_stage(start: Start, args, info: DistInfo, batches, settings: LoopSettings, hooks: Hooks, loss_fn=None) -> tuple[int, TrainLoop]:
    """Run the one training loop for a stage (checkpoints, resume, wandb); (exit code, the loop)."""
    meta = {"model_config": start.model.config.to_dict(), "args": vars(args), "started_from": start.origin()}
    tracker = Tracker(args.run, {"args": vars(args), "stage": start.stage}, info.is_master)
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


def run_stage(spec: StageSpec, args, info: DistInfo) -> int:
    """Train one post-training stage (midtraining or SFT); returns the exit code."""
    t0 = time.time()
    tokenizer = get_tokenizer()
    start = load_start(spec.name, args.source, args, info, args.default_device_batch, args.max_seq_len)
    seq_len = args.max_seq_len or start.model.config.sequence_len
    rows_per_step = spec.rows_per_step(args, seq_len)
    per_pass = args.device_batch_size * info.world_size
    if rows_per_step % per_pass:
        raise PlanError(f"rows per step ({rows_per_step}) must be a multiple of device batch x ranks ({per_pass})")
    train_task = spec.train_mixture(args)
    steps = args.num_iterations if args.num_iterations > 0 else spec.steps_for(args, train_task, tokenizer, rows_per_step, seq_len)
    print0(f"{get_stage(spec.name).title}: from {start.started_from()}; {len(train_task):,} training conversations, "
           f"{steps:,} steps of {rows_per_step} rows x {seq_len} tokens ({rows_per_step // per_pass} accumulation step(s))")
    prepare_training(start, args, info, steps)
    batches = spec.batches(tokenizer, train_task, args.device_batch_size, seq_len, device=info.device, rank=info.rank,
                           world_size=info.world_size, state=start.resumed.data_state)
    val_task = spec.val_mixture(args)

    def validate(step: int) -> dict:
        val = spec.batches(tokenizer, val_task, args.device_batch_size, seq_len, device=info.device, rank=info.rank, world_size=info.world_size)
        bpb = evaluate_bpb(start.step_model, val, args.eval_steps, tokenizer.token_bytes())
        print0(f"step {step:06d} | validation bits per byte: {bpb:.4f}")
        return {"val_bpb": bpb}

    settings = LoopSettings(num_iterations=steps, grad_accum_steps=rows_per_step // per_pass, warmdown_ratio=args.warmdown_ratio,
                            eval_every=args.eval_every, save_every=args.save_every, keep_last=args.keep_last, warm_momentum=False,
                            cost=cost_settings(args))
    code, loop = train_stage(start, args, info, batches, settings, Hooks(evaluate=validate))
    if code == 0 and info.is_master:
        report_stage(start, {"steps": steps, "training conversations": len(train_task),
                             "val bpb": loop.metrics.get("val_bpb", float("nan"))}, loop, t0)
    return code


def steps_for_epochs(args, rows: int, rows_per_step: int) -> int:
    """Optimizer steps for args.epochs passes over `rows` rows."""
    return max(1, math.ceil(args.epochs * rows / rows_per_step))



class FirstN:
    """The first n examples of a task (for quick runs: --max-examples)."""

    def __init__(self, task, n: int | None):
        self.task, self.n = task, len(task) if n is None else min(n, len(task))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.task[index]
