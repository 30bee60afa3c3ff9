"""What every task is: a sliceable list of conversations with a scorer.

A task's examples are conversations, {"messages": [...]}, that the tokenizer
renders; categorical tasks add "letters", the answer letters the evaluator
chooses among. `TaskSequence` and `TaskMixture` combine tasks into one, which
is again a Task, so mixtures can be sliced and nested like any dataset.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from nanochat.common import DataError
from nanochat.conversation import message_problem, order_problem


class TaskDataError(DataError, ValueError):
    """A dataset row (or the file holding it) is not what the task expects; the message names it."""


class Task:
    """Examples `start`, `start + step`, ... (up to `stop`) of a dataset.

    Subclasses implement `num_examples()` and `get_example(index)` over the whole
    dataset; `len()` and `[i]` see only the slice. `evaluate` returns 1 or 0,
    `reward` (for RL) the same as a float unless a task knows better.
    """

    eval_type = "generative"  # or "categorical": the completion is then the chosen letter

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        _check_index_arg("start", start, minimum=0)
        if stop is not None:
            _check_index_arg("stop", stop, minimum=0)
        _check_index_arg("step", step, minimum=1)
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement num_examples()")

    def get_example(self, index: int) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement get_example(index)")

    def evaluate(self, conversation: dict, completion: str) -> int:
        raise NotImplementedError(f"{type(self).__name__} has no scorer")

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))

    def __len__(self) -> int:
        total = self.num_examples()
        stop = total if self.stop is None else min(self.stop, total)
        return len(range(self.start, stop, self.step))

    def __getitem__(self, i: int) -> dict:
        size = len(self)
        position = i + size if i < 0 else i
        if not 0 <= position < size:
            raise IndexError(f"{type(self).__name__} index {i} out of range ({size} examples)")
        return self.get_example(self.start + position * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _check_index_arg(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class TaskSequence(Task):
    """All examples of the first task, then all of the second, and so on.

    Listing a task twice repeats it (two epochs of it in one pass).
    """

    def __init__(self, tasks: Sequence, **slicing):
        super().__init__(**slicing)
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        self.tasks = list(tasks)
        self._ends = np.cumsum([len(task) for task in self.tasks]).tolist()

    def num_examples(self) -> int:
        return self._ends[-1]

    def get_example(self, index: int) -> dict:
        which = bisect.bisect_right(self._ends, index)
        begin = self._ends[which - 1] if which else 0
        return self.tasks[which][index - begin]


class TaskMixture(TaskSequence):
    """Every example of every task exactly once, in an order fixed by `seed`.

    The order comes from numpy's legacy RandomState, whose stream numpy
    keeps frozen, so a seed gives the same order on every machine and numpy
    version (the newer Generator API does not promise that).
    """

    def __init__(self, tasks: Sequence, seed: int = 42, **slicing):
        super().__init__(tasks, **slicing)
        self.seed = seed
        self._order = np.random.RandomState(seed).permutation(self.num_examples())

    def get_example(self, index: int) -> dict:
        return super().get_example(int(self._order[index]))


def validate_conversation(messages) -> str | None:
    """The first problem with a training conversation's messages, or None when it is usable.

    Usable: well formed (nanochat.conversation: an optional leading system
    message, then user and assistant alternating from the user), at least one
    user and one assistant message, and no content empty.
    """
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, message in enumerate(messages):
        problem = message_problem(message) or _empty_problem(message["content"])
        if problem:
            return f"message {i}: {problem}"
    problem = order_problem(messages)
    if problem:
        return problem
    if len(messages) - (messages[0]["role"] == "system") < 2:
        return "needs at least one user and one assistant message"
    return None


def _empty_problem(content) -> str | None:
    if isinstance(content, list):
        if not content:
            return "content is an empty list of parts"
        content = "".join(part["text"] for part in content)
    return None if content.strip() else "content is empty"
