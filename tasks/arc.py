"""ARC (allenai/ai2_arc): grade-school science questions with 3-5 options.

Subsets "ARC-Easy" and "ARC-Challenge", splits train / validation / test.
Columns: question, choices {text: [...], label: [...]}, answerKey. Labels are
letters or digits ("1".."4") depending on the row; options are re-lettered
A, B, C, ... in their given order and answerKey follows its label.
"""

from __future__ import annotations

from pathlib import Path

from tasks.base import TaskDataError
from tasks.hub import HubTask
from tasks.multiple_choice import MultipleChoiceTask, multiple_choice_conversation
from tasks.records import field

REPO = "allenai/ai2_arc"
class ARC(MultipleChoiceTask, HubTask):
    repo = REPO
    local_name = "arc-{subset}-{split}"
    splits = {subset: ("train", "validation", "test") for subset in ("ARC-Easy", "ARC-Challenge")}

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", path: str | Path | None = None, **slicing):
        super().__init__(subset, split, path, **slicing)

    def get_example(self, index: int) -> dict:
        where = self.records.where(index)
        row = self.records[index]
        choices = field(row, "choices", dict, where)
        texts, labels = field(choices, "text", list, f"{where}, choices"), field(choices, "label", list, f"{where}, choices")
        key = field(row, "answerKey", str, where)
        if len(texts) != len(labels) or key not in labels:
            raise TaskDataError(f"{where}: answerKey {key!r} must be one of the labels {labels!r}, "
                                f"one label per choice text ({len(texts)} texts)")
        return multiple_choice_conversation(field(row, "question", str, where), texts, labels.index(key), where)
