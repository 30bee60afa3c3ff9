"""What midtraining and SFT share: flags, loading the previous stage, the loop, the report.

A stage is described by a `StageSpec` (where it starts, where it writes, how it
batches, which mixtures it trains and validates on); `run_stage` does the rest
with the same loop, checkpoints and resume as pretraining.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Callable

from nanochat.checkpoint import CheckpointError, load_model, stage_dir
from nanochat.common import DistInfo, compute_cleanup, compute_init, print0, setup_logging
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import build_optimizers
from nanochat.report import write_section
from nanochat.tokenizer import TokenizerError, get_tokenizer
from nanochat.tracking import Tracker
from nanochat.energy import add_cost_args
from nanochat.runtime import MemoryRefusal, add_compute_args, add_memory_args, fit_device_batch, prepare_model, set_compute_dtype
from nanochat.training import Hooks, LoopSettings, Resumed, TrainLoop, cost_settings, resume_from


@dataclass
class StageSpec:
    name: str  # "mid" or "sft": also the checkpoint stage it writes
    title: str
    start_from: str  # the stage whose model it starts from
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
    g.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="learning rates as a fraction of pretraining's (default %(default)s)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate before --init-lr-frac (default %(default)s)")
    g.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the embedding (default %(default)s)")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the head (default %(default)s)")
    g.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps over which the lr decays to 0 (default %(default)s)")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=150, help="validation every N steps; 0 for only at the end (default %(default)s)")
    g.add_argument("--eval-steps", type=int, default=20, help="validation batches per evaluation (default %(default)s)")
    add_run_args(g, save_every=500)


def add_run_args(group, *, save_every: int) -> None:
    """Checkpoints, resume, wandb, the final chat evaluation, cost figures and device: every post-training stage's."""
    group.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps; 0 for only at the end (default %(default)s)")
    group.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (default %(default)s)")
    group.add_argument("--resume", action="store_true", help="continue from this stage's newest complete checkpoint")
    group.add_argument("--run", default=None, help="wandb run name; no name, no wandb")
    add_final_eval_args(group)
    add_cost_args(group)
    group.add_argument("--device", default=None, choices=["cuda", "mps", "cpu"], help="override device autodetection")
    add_compute_args(group)
    add_memory_args(group)


def add_final_eval_args(group) -> None:
    group.add_argument("--no-eval", action="store_true", help="skip the chat evaluation at the end")
    group.add_argument("--eval-problems", type=int, default=None, help="problems per task in that evaluation (default: all)")


def stage_main(spec: StageSpec, args) -> int:
    """What a stage script's main() does before its final chat evaluation
    (scripts.chat_eval.final_chat_eval): set up, train, clean up; the exit code."""
    setup_logging()
    info = compute_init(args.device)
    try:
        code = run_stage(spec, args, info)
    except (CheckpointError, TokenizerError, FileNotFoundError, ValueError) as exc:
        print0(f"error: {exc}")
        code = 2
    except MemoryRefusal as exc:
        print0(f"error: {exc}")
        code = 3
    finally:
        compute_cleanup()
    return code


def run_stage(spec: StageSpec, args, info: DistInfo) -> int:
    """Train one post-training stage; returns the exit code."""
    t0 = time.time()
    tokenizer = get_tokenizer()
    source = args.source or spec.start_from
    model, start_meta = load_model(source, args.model_tag, args.step, device=info.device)
    model.train()
    seq_len = args.max_seq_len or model.config.sequence_len
    tag = start_meta["model_tag"]
    tag_dir = stage_dir(spec.name) / tag
    set_compute_dtype(model, args, info.device)
    args.device_batch_size, memory_estimate = fit_device_batch(model, args, args.default_device_batch, seq_len, info, spec.name)
    rows_per_step = spec.rows_per_step(args, seq_len)
    per_pass = args.device_batch_size * info.world_size
    if rows_per_step % per_pass:
        raise CheckpointError(f"rows per step ({rows_per_step}) must be a multiple of device batch x ranks ({per_pass})")
    train_task = spec.train_mixture(args)
    steps = args.num_iterations if args.num_iterations > 0 else spec.steps_for(args, train_task, tokenizer, rows_per_step, seq_len)
    print0(f"{spec.title}: from {source} {tag} step {start_meta['step']:,}; {len(train_task):,} training conversations, "
           f"{steps:,} steps of {rows_per_step} rows x {seq_len} tokens ({rows_per_step // per_pass} accumulation step(s))")
    frac = args.init_lr_frac
    optimizers = build_optimizers(model, embedding_lr=args.embedding_lr * frac, unembedding_lr=args.unembedding_lr * frac,
                                  matrix_lr=args.matrix_lr * frac, world_size=info.world_size)
    resumed = resume_from(tag_dir, model, optimizers, info) if args.resume else Resumed()
    step_model = prepare_model(model, args, info.device, steps)
    batches = spec.batches(tokenizer, train_task, args.device_batch_size, seq_len, device=info.device, rank=info.rank,
                           world_size=info.world_size, state=resumed.data_state)
    val_task = spec.val_mixture(args)

    def validate(step: int) -> dict:
        val = spec.batches(tokenizer, val_task, args.device_batch_size, seq_len, device=info.device, rank=info.rank, world_size=info.world_size)
        bpb = evaluate_bpb(step_model, val, args.eval_steps, tokenizer.token_bytes())
        print0(f"step {step:06d} | validation bits per byte: {bpb:.4f}")
        return {"val_bpb": bpb}

    settings = LoopSettings(num_iterations=steps, grad_accum_steps=rows_per_step // per_pass, warmdown_ratio=args.warmdown_ratio,
                            eval_every=args.eval_every, save_every=args.save_every, keep_last=args.keep_last, warm_momentum=False,
                            cost=cost_settings(args))
    meta = {"model_config": model.config.to_dict(), "args": vars(args), "started_from": {k: start_meta[k] for k in ("source", "model_tag", "step")}}
    tracker = Tracker(args.run, {"args": vars(args), "stage": spec.name}, info.is_master)
    loop = TrainLoop(model=model, step_model=step_model, optimizers=optimizers, batches=batches, settings=settings, info=info, tag_dir=tag_dir,
                     meta=meta, hooks=Hooks(evaluate=validate), tracker=tracker, resumed=resumed, memory_estimate=memory_estimate)
    try:
        code = loop.run()
    finally:
        tracker.finish()
    if code == 0 and info.is_master:
        items = {"started from": f"{source} {tag} step {start_meta['step']}", "steps": steps, "training conversations": len(train_task),
                 "val bpb": loop.metrics.get("val_bpb", float("nan")), "wall time (s)": round(time.time() - t0, 1), **loop.energy_items()}
        write_section(f"{spec.name}-train", spec.title, items)
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
