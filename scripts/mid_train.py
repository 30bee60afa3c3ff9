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

from nanochat.chat_data import PackedConversations
from nanochat.flags import FlagParser
from nanochat.posttrain import FirstN, StageSpec, add_stage_args, stage_main
from tasks.chat_eval import final_chat_eval


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.mid_train", description="Midtrain the base model on conversations.")
    add_stage_args(p, device_batch=32, init_lr_frac=1.0)
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step across all ranks (default %(default)s)")
    return p.parse_args(argv)


def train_mixture(args):
    from tasks import GSM8K, MMLU, CustomJSON, SimpleSpelling, SmolTalk, SpellingBee, TaskMixture

    identity = CustomJSON()
    parts = [SmolTalk("train"), MMLU("auxiliary_train", "train", stop=100_000), GSM8K("train"), identity, identity,
             SimpleSpelling(200_000, "train"), SpellingBee(80_000, "train")]
    return FirstN(TaskMixture(parts, seed=42), args.max_examples)


def val_mixture(args):
    from tasks import GSM8K, MMLU, SmolTalk, TaskMixture

    return FirstN(TaskMixture([SmolTalk("test"), MMLU("all", "test", stop=5_000), GSM8K("test", stop=420)], seed=7), args.max_examples)


def steps_for(args, task, tokenizer, rows_per_step: int, seq_len: int) -> int:
    """One epoch's steps, from the rendered length of an even sample of the mixture."""
    sample = [task[i] for i in range(0, len(task), max(1, len(task) // 500))]
    mean_tokens = sum(len(tokenizer.render_conversation(c, max_tokens=64 * (seq_len + 1))[0]) for c in sample) / len(sample)
    return max(1, math.ceil(args.epochs * mean_tokens * len(task) / (rows_per_step * (seq_len + 1))))


SPEC = StageSpec(name="mid", batches=PackedConversations,
                 train_mixture=train_mixture, val_mixture=val_mixture, steps_for=steps_for,
                 rows_per_step=lambda args, seq_len: max(1, args.total_batch_size // seq_len))


def main(argv=None) -> int:
    args = parse_args(argv)
    code = stage_main(SPEC, args)
    return final_chat_eval(SPEC.name, args) if code == 0 else code


if __name__ == "__main__":
    sys.exit(main())
