"""Midtraining: teach the base model the chat format, tool use and multiple choice.

    python -m scripts.mid_train                      # from the newest base model
    torchrun --standalone --nproc_per_node=2 -m scripts.mid_train

Trains on SmolTalk + MMLU auxiliary_train (100K) + GSM8K train + identity
conversations (2 epochs) + spelling tasks, rendered as chats and packed into
full rows; validates on held-out SmolTalk / MMLU / GSM8K. Writes
mid_checkpoints/<tag>/ and the "mid-train" report section, then runs
scripts.chat_eval on the result (unless --no-eval).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from nanochat.chat_data import PackedConversations
from nanochat.common import print0, setup_logging
from nanochat.flags import FlagParser
from nanochat.optim import learning_rates
from nanochat.posttrain import (accumulation_steps, add_stage_args, load_start, prepare_training,
                                report_stage, train_stage, validation)
from nanochat.runtime import BatchRequest, ComputeSettings, fit_device_batch
from nanochat.tokenizer import get_tokenizer
from nanochat.training import Hooks, LoopSettings, cost_settings, run_guarded
from tasks.chat_eval import final_chat_eval

DEFAULT_DEVICE_BATCH = 32  # rows per forward pass when memory allows: pretraining's


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.mid_train", description="Midtrain the base model on conversations (chat format, "
                   "tool use, multiple choice), then the chat evaluation. Safe to stop with Ctrl-C (a checkpoint is "
                   "saved): run it again and it continues.")
    add_stage_args(p, "mid", device_batch=DEFAULT_DEVICE_BATCH, init_lr_frac=1.0)
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step across all ranks (default %(default)s)")
    return p.parse_args(argv)


def train_mixture(max_examples: int | None):
    """The shuffled mixture, its first max_examples only (quick runs)."""
    from tasks import GSM8K, MMLU, CustomJSON, SimpleSpelling, SmolTalk, SpellingBee, TaskMixture

    identity = CustomJSON()
    parts = [SmolTalk("train"), MMLU("auxiliary_train", "train", stop=100_000), GSM8K("train"), identity, identity,
             SimpleSpelling(200_000, "train"), SpellingBee(80_000, "train")]
    return TaskMixture(parts, seed=42, stop=max_examples)


def val_mixture(max_examples: int | None):
    from tasks import GSM8K, MMLU, SmolTalk, TaskMixture

    return TaskMixture([SmolTalk("test"), MMLU("all", "test", stop=5_000), GSM8K("test", stop=420)], seed=7, stop=max_examples)


def epoch_steps(task, tokenizer, rows_per_step: int, seq_len: int, epochs: float) -> int:
    """Steps for `epochs` passes, from the rendered length of an even sample of the mixture (rows are packed)."""
    sample = [task[i] for i in range(0, len(task), max(1, len(task) // 500))]
    mean_tokens = sum(len(tokenizer.render_conversation(c, max_tokens=64 * (seq_len + 1))[0]) for c in sample) / len(sample)
    return max(1, math.ceil(epochs * mean_tokens * len(task) / (rows_per_step * (seq_len + 1))))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    code = run_guarded(lambda info: train(args, info), device=args.device,
                       device_batch=lambda: args.device_batch_size or DEFAULT_DEVICE_BATCH)
    if code == 0 and not args.no_eval:
        code = final_chat_eval("mid", model_tag=args.model_tag, max_problems=args.eval_problems, device=args.device, dtype=args.dtype)
    return code


def train(args, info) -> int:
    t0 = time.time()
    tokenizer = get_tokenizer()
    # the model: the newest base model (or --source), and the largest device batch whose measured step fits on every rank
    start = load_start("mid", args.source, args.model_tag, args.step, info, args.dtype)
    seq_len = args.max_seq_len or start.model.config.sequence_len
    request = BatchRequest(DEFAULT_DEVICE_BATCH, args.device_batch_size, args.auto_batch, args.ignore_memory_check, args.memory_limit)
    batch, start.memory_estimate = fit_device_batch(start.model, request, seq_len, info, "mid",
                                                    checkpoint_blocks=args.activation_checkpointing)
    # the data and the plan: --epochs passes over the mixture, packed into rows of --total-batch-size tokens per step
    train_task, val_task = train_mixture(args.max_examples), val_mixture(args.max_examples)
    rows_per_step = max(1, args.total_batch_size // seq_len)
    accumulate = accumulation_steps(rows_per_step, batch, info.world_size)
    steps = args.num_iterations if args.num_iterations > 0 else epoch_steps(train_task, tokenizer, rows_per_step, seq_len, args.epochs)
    print0(f"Midtraining: from {start.started_from()}; {len(train_task):,} training conversations, {steps:,} steps "
           f"of {rows_per_step} rows x {seq_len} tokens ({accumulate} accumulation step(s))")
    # the loop: optimizers, this stage's own checkpoint when continuing, packed rows, validation bpb
    flags = {**vars(args), "device_batch_size": batch}
    compute = ComputeSettings(args.dtype, args.compile, args.activation_checkpointing)
    rates = learning_rates(args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.init_lr_frac)
    prepare_training(start, info, steps, rates=rates, resume_mode=args.resume_mode, settings=flags, compute=compute)

    def rows(task, state=None):
        return PackedConversations(tokenizer, task, batch, seq_len, device=info.device, rank=info.rank,
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
