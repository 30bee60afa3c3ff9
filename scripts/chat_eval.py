"""Evaluate a chat model: ARC, MMLU, GSM8K, HumanEval, spelling, and ChatCORE.

    python -m scripts.chat_eval -i sft                  # every task
    python -m scripts.chat_eval -i mid -a ARC-Easy GSM8K --max-problems 100
    torchrun --standalone --nproc_per_node=2 -m scripts.chat_eval -i rl

How each task is scored: tasks/chat_eval.py.
"""

from __future__ import annotations

import argparse
import sys

from nanochat.common import add_device_arg, setup_logging
from nanochat.flags import FlagParser
from nanochat.runtime import add_dtype_arg
from tasks.chat_eval import EvalSettings, run_chat_eval, task_table


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.chat_eval", description="Evaluate a chat model on its tasks.")
    p.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="which stage's model")
    p.add_argument("-a", "--tasks", nargs="+", default=None, choices=list(task_table()), metavar="TASK",
                   help=f"tasks to run (default: all of {' '.join(task_table())})")
    p.add_argument("--model-tag", default=None, help="model tag (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--max-problems", type=int, default=None, help="evaluate at most N problems per task")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass / sequences decoded together (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest generated answer (default %(default)s)")
    add_device_arg(p)
    add_dtype_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_chat_eval(EvalSettings(**vars(args)))


if __name__ == "__main__":
    sys.exit(main())
