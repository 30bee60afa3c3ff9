"""Supervised finetuning: one conversation per row, loss only on what the assistant says.

    python -m scripts.chat_sft                       # from the newest midtrained model
    python -m scripts.chat_sft --source base         # straight from the base model

Mixture: ARC-Easy + ARC-Challenge train, GSM8K train, 10K SmolTalk, identity
conversations and a few hundred spelling rows. Writes chatsft_checkpoints/<tag>/
and the "sft-train" report section, then runs scripts.chat_eval (unless --no-eval).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from nanochat.chat_data import PaddedConversations
from nanochat.common import print0, setup_logging
from nanochat.flags import FlagParser
from nanochat.optim import learning_rates
from nanochat.posttrain import (accumulation_steps, add_stage_args, load_start, prepare_training,
                                report_stage, train_stage, validation)
from nanochat.runtime import BatchRequest, ComputeSettings, fit_device_batch
from nanochat.tokenizer import get_tokenizer
from nanochat.training import Hooks, LoopSettings, cost_settings, run_guarded
from tasks.chat_eval import final_chat_eval

DEFAULT_DEVICE_BATCH = 4  # rows per forward pass when memory allows; conversations are padded, not packed


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.chat_sft", description="Supervised finetuning on conversations, then the chat "
                   "evaluation. Safe to stop with Ctrl-C (a checkpoint is saved): run it again and it continues.")
    add_stage_args(p, "sft", device_batch=DEFAULT_DEVICE_BATCH, init_lr_frac=0.02)
    p.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step across all ranks (default %(default)s)")
    return p.parse_args(argv)


def train_mixture(max_examples: int | None):
    """The shuffled mixture, its first max_examples only (quick runs)."""
    from tasks import ARC, GSM8K, CustomJSON, SimpleSpelling, SmolTalk, SpellingBee, TaskMixture

    parts = [ARC("ARC-Easy", "train"), ARC("ARC-Challenge", "train"), GSM8K("train"), SmolTalk("train", stop=10_000),
             CustomJSON(), SimpleSpelling(300, "train"), SpellingBee(300, "train")]
    return TaskMixture(parts, seed=42, stop=max_examples)


def val_mixture(max_examples: int | None):
    from tasks import SmolTalk

    return SmolTalk("test", stop=min(1_000, max_examples or 1_000))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    code = run_guarded(lambda info: train(args, info), device=args.device,
                       device_batch=lambda: args.device_batch_size or DEFAULT_DEVICE_BATCH)
    if code == 0 and not args.no_eval:
        code = final_chat_eval("sft", model_tag=args.model_tag, max_problems=args.eval_problems, device=args.device, dtype=args.dtype)
    return code


def train(args, info) -> int:
    t0 = time.time()
    tokenizer = get_tokenizer()
    # the model: the midtrained one (or --source), and the largest device batch whose measured step fits on every rank
    start = load_start("sft", args.source, args.model_tag, args.step, info, args.dtype)
    seq_len = args.max_seq_len or start.model.config.sequence_len
    request = BatchRequest(DEFAULT_DEVICE_BATCH, args.device_batch_size, args.auto_batch, args.ignore_memory_check, args.memory_limit)
    batch, start.memory_estimate = fit_device_batch(start.model, request, seq_len, info, "sft",
                                                    checkpoint_blocks=args.activation_checkpointing)
    # the data and the plan: --epochs passes over the mixture, --examples-per-step conversations per step
    train_task, val_task = train_mixture(args.max_examples), val_mixture(args.max_examples)
    accumulate = accumulation_steps(args.examples_per_step, batch, info.world_size)
    steps = args.num_iterations if args.num_iterations > 0 else max(1, math.ceil(args.epochs * len(train_task) / args.examples_per_step))
    print0(f"Supervised finetuning: from {start.started_from()}; {len(train_task):,} training conversations, {steps:,} steps "
           f"of {args.examples_per_step} rows x {seq_len} tokens ({accumulate} accumulation step(s))")
    # the loop: optimizers, this stage's own checkpoint when continuing, one conversation per row, validation bpb
    flags = {**vars(args), "device_batch_size": batch}
    compute = ComputeSettings(args.dtype, args.compile, args.activation_checkpointing)
    rates = learning_rates(args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.init_lr_frac)
    prepare_training(start, info, steps, rates=rates, resume_mode=args.resume_mode, settings=flags, compute=compute)

    def rows(task, state=None):
        return PaddedConversations(tokenizer, task, batch, seq_len, device=info.device, rank=info.rank,
                                   world_size=info.world_size, state=state)

    hooks = Hooks(evaluate=validation(start, lambda: rows(val_task), args.eval_steps, tokenizer.token_bytes()))
    settings = LoopSettings(num_iterations=steps, grad_accum_steps=accumulate, warmdown_ratio=args.warmdown_ratio,
                            eval_every=args.eval_every, save_every=args.save_every, keep_last=args.keep_last, warm_momentum=False,
                            cost=cost_settings(args.price_per_kwh, args.hardware_price, args.hardware_lifetime_years))
    code, loop = train_stage(start, info, rows(train_task, start.resumed.data_state), settings, hooks, run=args.run, flags=flags)
    # the report (the chat evaluation follows in main)
    if code == 0 and info.is_master:
        report_stage(start, {"steps": steps, "training conversations": len(train_task),
                             "val bpb": loop.metrics.get("val_bpb", float("nan"))}, loop, t0)
    return code


if __name__ == "__main__":
    sys.exit(main())
