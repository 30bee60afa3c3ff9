"""Evaluate a chat model: ARC, MMLU, GSM8K, HumanEval, spelling, and ChatCORE.

    python -m scripts.chat_eval -i sft                  # every task
    python -m scripts.chat_eval -i mid -a ARC-Easy GSM8K --max-problems 100
    torchrun --standalone --nproc_per_node=2 -m scripts.chat_eval -i rl

Multiple-choice tasks are scored from the logits of the option letters after
the prompt (no sampling); the others generate answers through the engine,
batched, and score them. ChatCORE is the mean accuracy after centering each
task by its chance level (0.25 for 4-way multiple choice, 0 for generative).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint import CheckpointError, load_model
from nanochat.common import compute_cleanup, compute_init, print0, setup_logging
from nanochat.engine import Engine, collect
from nanochat.flags import FlagParser
from nanochat.report import write_section
from nanochat.runtime import add_dtype_arg, set_compute_dtype
from nanochat.sampling import SamplingParams
from nanochat.tokenizer import TokenizerError, get_tokenizer

CHANCE = {"categorical": 0.25, "generative": 0.0}


def task_table() -> dict:
    from tasks import ARC, GSM8K, MMLU, HumanEval, SpellingBee

    return {
        "ARC-Easy": lambda: ARC("ARC-Easy", "test"),
        "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
        "MMLU": lambda: MMLU("all", "test"),
        "GSM8K": lambda: GSM8K("test"),
        "HumanEval": lambda: HumanEval(),
        "SpellingBee": lambda: SpellingBee(256, "test"),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.chat_eval", description="Evaluate a chat model on its tasks.")
    p.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="which stage's model")
    p.add_argument("-a", "--tasks", nargs="+", default=None, help="tasks to run (default: all of ARC-Easy ARC-Challenge MMLU GSM8K HumanEval SpellingBee)")
    p.add_argument("--model-tag", default=None, help="model tag (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--max-problems", type=int, default=None, help="evaluate at most N problems per task")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass / sequences decoded together (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest generated answer (default %(default)s)")
    p.add_argument("--device", default=None, choices=["cuda", "mps", "cpu"], help="override device autodetection")
    add_dtype_arg(p)
    return p.parse_args(argv)


def my_indices(n: int, rank: int, world: int, limit: int | None) -> list[int]:
    return list(range(rank, min(n, limit) if limit else n, world))


@torch.no_grad()
def score_categorical(model, tokenizer, task, indices: list[int], batch_size: int) -> int:
    """Correct answers: the option letter with the highest logit after each prompt."""
    correct, device = 0, next(model.parameters()).device
    for start in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[start : start + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        width = max(len(p) for p in prompts)
        batch = torch.full((len(prompts), width), tokenizer.get_bos_token_id(), dtype=torch.long)
        for r, p in enumerate(prompts):
            batch[r, : len(p)] = torch.tensor(p)
        logits = model(batch.to(device))
        for r, conv in enumerate(convs):
            letters = conv["letters"]
            letter_ids = [tokenizer.encode(letter)[0] for letter in letters]
            last = logits[r, len(prompts[r]) - 1, letter_ids]
            correct += task.evaluate(conv, letters[int(last.argmax())])
    return correct


def score_generative(engine: Engine, tokenizer, task, indices: list[int], batch_size: int, max_new_tokens: int) -> int:
    """Correct answers among greedy completions, decoded `batch_size` at a time."""
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    correct = 0
    for start in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[start : start + batch_size]]
        requests = [engine.submit(tokenizer.render_for_completion(c), params) for c in convs]
        while engine.has_work():
            engine.step()
        correct += sum(task.evaluate(c, collect(r, 1)[0].text) for c, r in zip(convs, requests))
    return correct


def all_reduce_counts(correct: int, total: int, device) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([correct, total], dtype=torch.long, device=device)
        dist.all_reduce(t)
        return int(t[0]), int(t[1])
    return correct, total


def chat_core(results: dict[str, tuple[float, str]]) -> float:
    """Mean over tasks of (accuracy - chance) / (1 - chance)."""
    centered = [(acc - CHANCE[kind]) / (1 - CHANCE[kind]) for acc, kind in results.values()]
    return sum(centered) / len(centered)


def final_chat_eval(stage: str, args, tasks: list[str] | None = None) -> int:
    """The chat evaluation that ends every post-training stage (unless --no-eval), from its flags."""
    if args.no_eval:
        return 0
    argv = ["-i", stage] + (["-a", *tasks] if tasks else []) + (["--model-tag", args.model_tag] if args.model_tag else [])
    argv += ["--max-problems", str(args.eval_problems)] if args.eval_problems else []
    argv += ["--dtype", args.dtype] if args.dtype else []
    return main(argv + (["--device", args.device] if args.device else []))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    info = compute_init(args.device)
    try:
        return evaluate(args, info)
    except (CheckpointError, TokenizerError, FileNotFoundError, ValueError) as exc:
        print0(f"error: {exc}")
        return 2
    finally:
        compute_cleanup()


def evaluate(args, info) -> int:
    t0 = time.time()
    tokenizer = get_tokenizer()
    model, meta = load_model(args.source, args.model_tag, args.step, device=info.device)
    set_compute_dtype(model, args, info.device)
    table = task_table()
    names = args.tasks or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    engine = Engine(model, tokenizer, max_batch=args.batch_size)
    results = {}
    for name in names:
        task = table[name]()
        indices = my_indices(len(task), info.rank, info.world_size, args.max_problems)
        if task.eval_type == "categorical":
            correct = score_categorical(model, tokenizer, task, indices, args.batch_size)
        else:
            correct = score_generative(engine, tokenizer, task, indices, args.batch_size, args.max_new_tokens)
        correct, total = all_reduce_counts(correct, len(indices), info.device)
        results[name] = (correct / max(total, 1), task.eval_type)
        print0(f"{name:<14} {correct:>5}/{total:<5} = {100 * correct / max(total, 1):6.2f}%")
    score = chat_core(results)
    print0(f"{'ChatCORE':<14} {score:.4f}  ({meta['source']} {meta['model_tag']} step {meta['step']})")
    if info.is_master:
        items = {name: acc for name, (acc, _) in results.items()}
        items.update({"ChatCORE": score, "model": f"{meta['model_tag']} step {meta['step']}", "wall time (s)": round(time.time() - t0, 1)})
        write_section(f"chat-eval-{args.source}", f"Chat evaluation ({args.source})", items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
