"""MMLU (cais/mmlu): four-option questions on 57 subjects.

Evaluation uses subset "all", split "test" (~14K questions; "validation" and
"dev" exist too); training uses subset "auxiliary_train", split "train" (~100K),
whose rows wrap the same fields in a single column `train`. Columns: question,
subject, choices (4 strings), answer (0-3).
"""

from __future__ import annotations

from pathlib import Path

from tasks.hub import HubTask
from tasks.multiple_choice import MultipleChoiceTask, multiple_choice_conversation
from tasks.records import field

REPO = "cais/mmlu"
class MMLU(MultipleChoiceTask, HubTask):
    repo = REPO
    local_name = "mmlu-{subset}-{split}"
    splits = {"all": ("test", "validation", "dev"), "auxiliary_train": ("train",)}

    def __init__(self, subset: str = "all", split: str = "test", path: str | Path | None = None, **slicing):
        super().__init__(subset, split, path, **slicing)

    def get_example(self, index: int) -> dict:
        where = self.records.where(index)
        row = self.records[index]
        if "question" not in row and isinstance(row.get("train"), dict):
            row = row["train"]  # the auxiliary_train layout
        conversation = multiple_choice_conversation(
            field(row, "question", str, where), field(row, "choices", list, where), field(row, "answer", int, where), where
        )
        conversation["subject"] = row.get("subject") or ""
        return conversation
