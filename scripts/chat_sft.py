"""Supervised finetuning: one conversation per row, loss only on what the assistant says.

    python -m scripts.chat_sft                       # from the newest midtrained model
    python -m scripts.chat_sft --source base         # straight from the base model

Mixture: ARC-Easy + ARC-Challenge train, GSM8K train, 10K SmolTalk, identity
conversations and a few hundred spelling rows. Writes chatsft_checkpoints/<tag>/
and the "sft-train" report section, then runs scripts.chat_eval (unless --no-eval).
"""

from __future__ import annotations

import argparse
import sys

from nanochat.chat_data import PaddedConversations
from nanochat.flags import FlagParser
from nanochat.posttrain import FirstN, StageSpec, add_stage_args, stage_main, steps_for_epochs
from tasks.chat_eval import final_chat_eval


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.chat_sft", description="Supervised finetuning on conversations.")
    add_stage_args(p, device_batch=4, init_lr_frac=0.02)
    p.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step across all ranks (default %(default)s)")
    return p.parse_args(argv)


def train_mixture(args):
    from tasks import ARC, GSM8K, CustomJSON, SimpleSpelling, SmolTalk, SpellingBee, TaskMixture

    parts = [ARC("ARC-Easy", "train"), ARC("ARC-Challenge", "train"), GSM8K("train"), SmolTalk("train", stop=10_000),
             CustomJSON(), SimpleSpelling(300, "train"), SpellingBee(300, "train")]
    return FirstN(TaskMixture(parts, seed=42), args.max_examples)


def val_mixture(args):
    from tasks import SmolTalk

    return FirstN(SmolTalk("test", stop=1_000), args.max_examples)


SPEC = StageSpec(name="sft", batches=PaddedConversations,
                 train_mixture=train_mixture, val_mixture=val_mixture,
                 steps_for=lambda args, task, tokenizer, rows, seq_len: steps_for_epochs(args, len(task), rows),
                 rows_per_step=lambda args, seq_len: args.examples_per_step)


def main(argv=None) -> int:
    args = parse_args(argv)
    code = stage_main(SPEC, args)
    return final_chat_eval(SPEC.name, args) if code == 0 else code


if __name__ == "__main__":
    sys.exit(main())
