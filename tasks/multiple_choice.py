"""Multiple-choice questions (MMLU, ARC) as conversations, scored by the chosen letter.

The user message holds the question, the lettered options and the request to
answer with a letter; the assistant's answer is that letter alone, so the
evaluator can compare the model's probabilities of the letter tokens.
"""

from __future__ import annotations

import string

from tasks.base import Task, TaskDataError

LETTERS = string.ascii_uppercase


def multiple_choice_conversation(question: str, choices: list[str], answer: int, where: str) -> dict:
    """{"messages": [user, assistant], "letters": [...]}; `where` names the row in errors."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise TaskDataError(f"{where}: expected 2 to {len(LETTERS)} choices, got {len(choices)}")
    if not all(isinstance(choice, str) for choice in choices):
        raise TaskDataError(f"{where}: every choice must be a string, got {choices!r:.200}")
    if not 0 <= answer < len(choices):
        raise TaskDataError(f"{where}: answer {answer} is not one of the {len(choices)} choices")
    letters = list(LETTERS[: len(choices)])
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
    listed = ", ".join(letters[:-1]) + " or " + letters[-1]
    prompt = f"{question.strip()}\n\n{options}\n\nAnswer with the letter of the correct option ({listed})."
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": letters[answer]}],
        "letters": letters,
    }


class MultipleChoiceTask(Task):
    """A task whose completions are the letter the model picked."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> int:
        return int(completion.strip().upper() == conversation["messages"][-1]["content"])
