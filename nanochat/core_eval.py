"""The CORE metric (DCLM, arXiv:2406.11794): in-context accuracy on 22 tasks, each
centered by its chance level, then averaged.

Every example is scored by likelihood, never by sampling:
- multiple_choice: one context, several continuations (the choices); the model
  picks the choice whose tokens get the lowest mean loss.
- schema: several contexts, one continuation; the model picks the context under
  which the continuation gets the lowest mean loss.
- language_modeling: correct iff greedy argmax reproduces every continuation token.

Few-shot examples, the shuffle behind --max-per-task and the prompt layout follow
nanochat's choices (seeds included), so a full run is comparable with its numbers.
The bundle itself (files, fetching) is nanochat/eval_bundle.py.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from nanochat.common import print0
from nanochat.eval_bundle import TaskSpec, load_task_data, load_task_specs
from nanochat.runtime import bucket_length

SHUFFLE_SEED = 1337  # task order is shuffled once, so a --max-per-task prefix is a fair sample
FEWSHOT_SEED = 1234  # plus the example's index: each example gets its own fixed shots
SHOT_SEPARATOR = "\n\n"

Rows = tuple[list[list[int]], list[int], list[int]]  # token rows, continuation start and end per row
# Rows per forward pass: an example's options go through this many at a time, the last
# batch filled with padding, so a compiled model meets one row count (and the width buckets of
# runtime.bucket_length) instead of every task's number of options. 4 is the choices of
# HellaSwag, ARC and OpenBookQA; 2-way tasks (PIQA, COPA, Winograd, Winogrande) waste half a batch.
CORE_ROWS = 4


# ---------------------------------------------------------------- prompts


def shuffled(data: list[dict]) -> list[dict]:
    """The task's examples in a fixed pseudo-random order (many files are sorted by topic)."""
    out = list(data)
    random.Random(SHUFFLE_SEED).shuffle(out)
    return out


def sample_fewshot(num_examples: int, idx: int, k: int) -> list[int]:
    """k distinct indices of examples other than `idx`, the same on every run.

    Drawn as positions among the other examples and shifted past `idx`, which
    gives exactly what sampling from the list without `idx` gives, in O(k).
    """
    k = min(k, num_examples - 1)
    if k <= 0:
        return []
    rng = random.Random(FEWSHOT_SEED + idx)
    return [j + (j >= idx) for j in rng.sample(range(num_examples - 1), k)]


def render_prompts(task_type: str, item: dict, shots: list[dict], delimiter: str) -> list[str]:
    """The full texts to score: one per choice (multiple_choice), one per context
    option (schema), or [context only, context + continuation] (language_modeling)."""
    renderers = {"multiple_choice": _render_choices, "schema": _render_schema, "language_modeling": _render_lm}
    return renderers[task_type](item, shots, delimiter)


def _render_choices(item: dict, shots: list[dict], delimiter: str) -> list[str]:
    prefix = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}{SHOT_SEPARATOR}" for s in shots)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def _render_schema(item: dict, shots: list[dict], delimiter: str) -> list[str]:
    prefix = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}{SHOT_SEPARATOR}" for s in shots)
    return [f"{prefix}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]


def _render_lm(item: dict, shots: list[dict], delimiter: str) -> list[str]:
    # Contexts in the bundle carry stray trailing whitespace; trimmed, and the
    # context-only prompt loses the delimiter's trailing space, so its tokens stay
    # a clean prefix of the full prompt's (" Paris" is one token, " " + "Paris" two).
    prefix = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}{SHOT_SEPARATOR}" for s in shots)
    context = f"{prefix}{item['context'].strip()}{delimiter}"
    return [context.rstrip(), context + item["continuation"]]


# ---------------------------------------------------------------- tokens


def common_prefix_length(rows: list[list[int]]) -> int:
    length = 0
    for column in zip(*rows):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


def continuation_rows(tokenizer, task_type: str, prompts: list[str]) -> Rows:
    """Tokenize whole prompts (BOS first) and find where each scored continuation starts.

    Tokenizing context and continuation apart would invent a token boundary the
    model never sees, so the boundary is where the rows stop agreeing instead:
    the common prefix (multiple_choice, language_modeling) or suffix (schema).
    Every row keeps at least one scored token, even when options tokenize alike.
    """
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    if task_type == "language_modeling":
        full = tokens[1]
        return [full], [_scorable(common_prefix_length(tokens), full)], [len(full)]
    if task_type == "multiple_choice":
        shared = common_prefix_length(tokens)
        return tokens, [_scorable(shared, row) for row in tokens], [len(row) for row in tokens]
    shared = common_prefix_length([row[::-1] for row in tokens])
    return tokens, [_scorable(len(row) - shared, row) for row in tokens], [len(row) for row in tokens]


def _scorable(start: int, row: list[int]) -> int:
    """`start` moved into [1, len(row) - 1]: BOS is never a target, and the last token always is."""
    return min(max(start, 1), len(row) - 1)


def crop_left(rows: Rows, max_len: int) -> Rows:
    """Fit each row into the model's context by dropping its oldest tokens.

    The continuation sits at the end, so the first few-shot examples go first;
    should a continuation itself not fit, only its tail is scored.
    """
    tokens, starts, ends = [], [], []
    for row, start, end in zip(*rows):
        drop = max(0, len(row) - max_len)
        tokens.append(row[drop:])
        starts.append(max(1, start - drop))
        ends.append(end - drop)
    return tokens, starts, ends


def prepare_example(tokenizer, data: list[dict], idx: int, spec: TaskSpec, max_len: int) -> Rows:
    shots = [data[j] for j in sample_fewshot(len(data), idx, spec.num_fewshot)]
    prompts = render_prompts(spec.task_type, data[idx], shots, spec.continuation_delimiter)
    return crop_left(continuation_rows(tokenizer, spec.task_type, prompts), max_len)


# ---------------------------------------------------------------- scoring


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _pad(tokens: list[list[int]], pad_id: int, model) -> torch.Tensor:
    # Right padding: causal attention keeps it from touching the real tokens. The
    # width is bucketed so a compiled model meets few shapes (runtime.compile_model allows
    # two kinds per width: these losses and greedy_reproduces' logits).
    width = bucket_length(max(map(len, tokens)), model.config.sequence_len)
    batch = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    for i, row in enumerate(tokens):
        batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return batch.to(_model_device(model))


@torch.no_grad()
def mean_continuation_losses(model, rows: Rows, pad_id: int) -> list[float]:
    """Mean loss (nats per token) of each row's continuation, CORE_ROWS rows per forward pass."""
    tokens, starts, ends = rows
    losses = []
    for first in range(0, len(tokens), CORE_ROWS):
        part = slice(first, first + CORE_ROWS)
        losses += _part_losses(model, (tokens[part], starts[part], ends[part]), pad_id)
    return losses


def _part_losses(model, rows: Rows, pad_id: int) -> list[float]:
    tokens, starts, ends = rows
    # rows of padding alone, no targets, fill the batch up to CORE_ROWS; their losses are dropped
    inputs = _pad(tokens + [[pad_id]] * (CORE_ROWS - len(tokens)), pad_id, model)
    targets = torch.full_like(inputs, -1)
    for i, (start, end) in enumerate(zip(starts, ends)):
        targets[i, start - 1 : end - 1] = inputs[i, start:end]
    losses = model(inputs, targets, loss_reduction="none").float()
    return (losses.sum(dim=1) / (targets != -1).sum(dim=1).clamp(min=1))[: len(tokens)].tolist()


@torch.no_grad()
def greedy_reproduces(model, rows: Rows, pad_id: int) -> bool:
    """Whether argmax at every position predicts the next continuation token (one row)."""
    (tokens,), (start,), (end,) = rows
    inputs = _pad([tokens], pad_id, model)
    predicted = model(inputs)[0, start - 1 : end - 1].argmax(dim=-1)
    return bool(torch.equal(predicted, inputs[0, start:end]))


def option_losses(model, tokenizer, data: list[dict], idx: int, spec: TaskSpec) -> list[float]:
    """Mean continuation loss of each option of a multiple_choice or schema example."""
    rows = prepare_example(tokenizer, data, idx, spec, model.config.sequence_len)
    return mean_continuation_losses(model, rows, tokenizer.get_bos_token_id())


def example_correct(model, tokenizer, data: list[dict], idx: int, spec: TaskSpec) -> bool:
    if spec.task_type == "language_modeling":
        rows = prepare_example(tokenizer, data, idx, spec, model.config.sequence_len)
        return greedy_reproduces(model, rows, tokenizer.get_bos_token_id())
    losses = option_losses(model, tokenizer, data, idx, spec)
    return losses.index(min(losses)) == data[idx]["gold"]


# ---------------------------------------------------------------- tasks and CORE


def rank_indices(num_examples: int, rank: int, world_size: int) -> range:
    return range(rank, num_examples, world_size)


def evaluate_task(model, tokenizer, data: list[dict], spec: TaskSpec, max_examples: int | None = None) -> float:
    """Accuracy on the task's first `max_examples` (all when None) after the fixed shuffle.

    Under torchrun each rank scores every world_size-th example and the counts
    are summed across ranks. Few-shot examples come from the whole task.
    """
    data = shuffled(data)
    count = len(data) if max_examples is None else min(max_examples, len(data))
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = rank_indices(count, rank, world_size)
    correct = sum(example_correct(model, tokenizer, data, idx, spec) for idx in mine)
    tally = torch.tensor([correct, len(mine)], dtype=torch.long, device=_model_device(model))
    if distributed:
        dist.all_reduce(tally)
    return tally[0].item() / max(1, tally[1].item())


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """0 at chance, 1 at perfect; `random_baseline` is in percent, as the bundle gives it."""
    chance = 0.01 * random_baseline
    return (accuracy - chance) / (1.0 - chance)


def core_metric(centered: dict[str, float]) -> float:
    return sum(centered.values()) / len(centered)


@dataclass
class CoreResult:
    accuracy: dict[str, float]  # task label -> raw accuracy
    centered: dict[str, float]  # task label -> centered accuracy
    core: float


def evaluate_core(
    model, tokenizer, bundle: Path, max_per_task: int | None = None, log: Callable[[str], None] = print0
) -> CoreResult:
    """Every task of the bundle, in core.yaml's order, logging one line per task.

    `max_per_task` limits each task to the same fixed subset on every run (None: all).
    """
    accuracy, centered = {}, {}
    for spec in load_task_specs(bundle):
        started = time.time()
        acc = evaluate_task(model, tokenizer, load_task_data(bundle, spec), spec, max_per_task)
        accuracy[spec.label] = acc
        centered[spec.label] = centered_accuracy(acc, spec.random_baseline)
        log(f"{spec.label:<34} {spec.num_fewshot:>2}-shot {spec.task_type:<17} "
            f"accuracy {acc:.4f}  centered {centered[spec.label]:+.4f}  ({time.time() - started:.1f}s)")
    return CoreResult(accuracy, centered, core_metric(centered))
