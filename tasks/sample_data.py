"""Small, generated task files in the real datasets' schemas, for offline runs and tests.

    python -m tasks.sample_data ~/nanochat-sample-tasks     # writes files, prints the `export` line

The files carry the names the loaders look for in the task-data folder
($NANOCHAT_TASK_DATA; tasks/__init__.py lists them), so with that set the whole post-training pipeline (midtraining, SFT, RL, chat_eval) runs
without the HuggingFace Hub. The content is synthetic but consistent: the
arithmetic word problems carry correct calculator annotations and answers,
multiple-choice answers are right, and the code tasks' solutions pass their tests.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from nanochat.fileio import atomic_write
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.hub import TASK_DATA_ENV
from tasks.humaneval import HumanEval
from tasks.identity import DEFAULT_FILE as IDENTITY_FILE
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spelling import LOCAL_FILE as WORDS_FILE

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Finn", "Gia", "Hugo"]
THINGS = ["apples", "books", "stamps", "marbles", "cookies", "pencils"]
TOPICS = ["the sea", "a mountain", "the moon", "a garden", "a river", "the city"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def gsm8k_rows(n: int, rnd: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        name, thing = rnd.choice(NAMES), rnd.choice(THINGS)
        a, b, c = rnd.randint(2, 40), rnd.randint(2, 40), rnd.randint(2, 5)
        total = a + b
        rows.append({
            "question": f"{name} has {a} {thing} and buys {b} more. Then {name} buys {c} times as many again. "
                        f"How many {thing} are there now?",
            "answer": f"{name} has {a}+{b} = <<{a}+{b}={total}>>{total} {thing}.\n"
                      f"Then {total}*{c + 1} = <<{total}*{c + 1}={total * (c + 1)}>>{total * (c + 1)} {thing}.\n#### {total * (c + 1)}",
        })
    return rows


def mmlu_rows(n: int, rnd: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = rnd.randint(1, 50), rnd.randint(1, 50)
        right = a + b
        choices = [right, right + rnd.randint(1, 5), right - rnd.randint(1, 5), right + 10]
        rnd.shuffle(choices)
        rows.append({"question": f"What is {a} + {b}?", "subject": "elementary_mathematics",
                     "choices": [str(x) for x in choices], "answer": choices.index(right)})
    return rows


def arc_rows(n: int, rnd: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        a = rnd.randint(2, 9)
        options = [a * 2, a * 3, a + 1, a * a + 1]
        rnd.shuffle(options)  # the right answer's letter varies, so a constant guess scores ~25%
        rows.append({"id": f"s{i}", "question": f"What is double {a}?", "answerKey": "ABCD"[options.index(a * 2)],
                     "choices": {"text": [str(o) for o in options], "label": ["A", "B", "C", "D"]}})
    return rows


def smoltalk_rows(n: int, rnd: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        topic, name = rnd.choice(TOPICS), rnd.choice(NAMES)
        rows.append({"messages": [
            {"role": "user", "content": f"Write one sentence about {topic}."},
            {"role": "assistant", "content": f"{name} walked to {topic} and thought it was beautiful."},
            {"role": "user", "content": "Now make it shorter."},
            {"role": "assistant", "content": f"{name} loved {topic}."},
        ]})
    return rows


HUMANEVAL = [
    ("add", "def add(a: int, b: int) -> int:\n    \"\"\"Return a + b.\"\"\"\n", "    return a + b\n",
     "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"),
    ("reverse", "def reverse(s: str) -> str:\n    \"\"\"Return s backwards.\"\"\"\n", "    return s[::-1]\n",
     "def check(f):\n    assert f('abc') == 'cba'\n    assert f('') == ''\n"),
    ("largest", "from typing import List\n\n\ndef largest(xs: List[int]) -> int:\n    \"\"\"Return the largest number.\"\"\"\n",
     "    return max(xs)\n", "def check(f):\n    assert f([1, 5, 2]) == 5\n"),
]


def humaneval_rows() -> list[dict]:
    return [{"task_id": f"Sample/{i}", "prompt": prompt, "canonical_solution": solution, "test": test, "entry_point": name}
            for i, (name, prompt, solution, test) in enumerate(HUMANEVAL)]


def identity_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in [
        ("Who are you?", "I am nanochat, a small language model trained from scratch on a DGX Spark."),
        ("Who made you?", "I was trained by my owner with the nanochat pipeline."),
        ("What can you do?", "I can chat, do arithmetic with a calculator, and answer multiple-choice questions."),
    ]]


def write_sample_task_files(folder: Path, size: int = 200, seed: int = 0) -> dict[str, str]:
    """Write every dataset's files into `folder`; return the environment variable that selects them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    for split in ("train", "test"):
        _jsonl(folder / f"{GSM8K.local_file('main', split)}.jsonl", gsm8k_rows(size, rnd))
        _jsonl(folder / f"{SmolTalk.local_file('default', split)}.jsonl", smoltalk_rows(size, rnd))
        for subset in ("ARC-Easy", "ARC-Challenge"):
            _jsonl(folder / f"{ARC.local_file(subset, split)}.jsonl", arc_rows(size, rnd))
    _jsonl(folder / f"{MMLU.local_file('all', 'test')}.jsonl", mmlu_rows(size, rnd))
    _jsonl(folder / f"{MMLU.local_file('auxiliary_train', 'train')}.jsonl", [{"train": r} for r in mmlu_rows(size, rnd)])
    _jsonl(folder / f"{HumanEval.local_file('openai_humaneval', 'test')}.jsonl", humaneval_rows())
    _jsonl(folder / IDENTITY_FILE, identity_rows())
    words = sorted({"".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(3, 9))) for _ in range(4 * size)})
    atomic_write(folder / WORDS_FILE, "\n".join(words) + "\n")
    return {TASK_DATA_ENV: str(folder.resolve())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.sample_data", description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="where to write the files")
    p.add_argument("--size", type=int, default=200, help="examples per dataset split (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    args = p.parse_args(argv)
    for key, value in write_sample_task_files(args.folder, args.size, args.seed).items():
        print(f"export {key}='{value}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
