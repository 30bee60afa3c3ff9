"""The chat evaluation: a chat model's accuracy on the task suite, and its ChatCORE.

`scripts.chat_eval` runs it from the command line; every post-training stage
runs it at its end (`final_chat_eval`, unless --no-eval). Multiple-choice tasks
are scored from the logits of the option letters after the prompt (no
sampling); the others generate greedy answers through the engine, batched, and
score them. ChatCORE is the mean accuracy after centering each task by its
chance level (0.25 for 4-way multiple choice, 0 for generative). Under
torchrun each rank takes every world-th problem and the counts are summed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.checkpoint import load_model
from nanochat.common import print0
from nanochat.engine import Engine, collect
from nanochat.report import write_section
from nanochat.runtime import set_compute_dtype
from nanochat.sampling import SamplingParams
from nanochat.schedule import PlanError
from nanochat.stages import chat_eval_section
from nanochat.tokenizer import get_tokenizer
from nanochat.training import run_guarded
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spelling import SpellingBee


@dataclass
class EvalSettings:
    """What to evaluate and how; the fields are scripts.chat_eval's flags."""

    source: str
    tasks: list[str] | None = None  # None: all of task_table()
    model_tag: str | None = None
    step: int | None = None
    max_problems: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 512
    device: str | None = None
    dtype: str | None = None


CHANCE = {"categorical": 0.25, "generative": 0.0}


def task_table() -> dict:
    return {
        "ARC-Easy": lambda: ARC("ARC-Easy", "test"),
        "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
        "MMLU": lambda: MMLU("all", "test"),
        "GSM8K": lambda: GSM8K("test"),
        "HumanEval": lambda: HumanEval(),
        "SpellingBee": lambda: SpellingBee(256, "test"),
    }


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
        correct += sum(task.evaluate(c, collect(r, engine.step)[0].text) for c, r in zip(convs, requests))
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


def final_chat_eval(stage: str, *, model_tag: str | None, max_problems: int | None, device: str | None,
                    dtype: str | None, tasks: list[str] | None = None) -> int:
    """The chat evaluation that ends a post-training stage (the newest model of its tag)."""
    return run_chat_eval(EvalSettings(source=stage, tasks=tasks, model_tag=model_tag, max_problems=max_problems or None,
                                      device=device, dtype=dtype))


def run_chat_eval(settings: EvalSettings) -> int:
    """Evaluate and write the report section; the exit status (nanochat.training.run_guarded: 2 when there is
    no model, tokenizer or data to evaluate)."""
    def work(info) -> int:
        evaluate(settings, info)
        return 0

    return run_guarded(work, device=settings.device)


def evaluate(settings: EvalSettings, info) -> None:
    t0 = time.time()
    tokenizer = get_tokenizer()
    model, meta = load_model(settings.source, settings.model_tag, settings.step, device=info.device)
    set_compute_dtype(model, settings.dtype, info.device)
    table = task_table()
    names = settings.tasks or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise PlanError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    engine = Engine(model, tokenizer, max_batch=settings.batch_size)
    results = {}
    for name in names:
        task = table[name]()
        indices = my_indices(len(task), info.rank, info.world_size, settings.max_problems)
        if task.eval_type == "categorical":
            correct = score_categorical(model, tokenizer, task, indices, settings.batch_size)
        else:
            correct = score_generative(engine, tokenizer, task, indices, settings.batch_size, settings.max_new_tokens)
        correct, total = all_reduce_counts(correct, len(indices), info.device)
        results[name] = (correct / max(total, 1), task.eval_type)
        print0(f"{name:<14} {correct:>5}/{total:<5} = {100 * correct / max(total, 1):6.2f}%")
    score = chat_core(results)
    print0(f"{'ChatCORE':<14} {score:.4f}  ({meta['source']} {meta['model_tag']} step {meta['step']})")
    if info.is_master:
        items = {name: acc for name, (acc, _) in results.items()}
        items.update({"ChatCORE": score, "model": f"{meta['model_tag']} step {meta['step']}", "wall time (s)": round(time.time() - t0, 1)})
        write_section(chat_eval_section(settings.source), f"Chat evaluation ({settings.source})", items)
