"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for midtraining and SFT.

Splits: "train" (~460K conversations) and "test" (~24K). Column `messages`:
a list of {role, content}. Rows are checked when read; a malformed one is an
error naming its file and row, never silently skipped.
"""

from __future__ import annotations

from pathlib import Path

from tasks.base import Task, TaskDataError, validate_conversation
from tasks.hub import HubDataset, open_records
from tasks.records import field

REPO = "HuggingFaceTB/smol-smoltalk"
SPLITS = ("train", "test")
ENV_VAR = "NANOCHAT_SMOLTALK_PATH"


class SmolTalk(Task):
    def __init__(self, split: str = "train", path: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        if split not in SPLITS:
            raise ValueError(f"SmolTalk split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.records = open_records(HubDataset(REPO, "default", split, ENV_VAR), path)

    def num_examples(self) -> int:
        return len(self.records)

    def get_example(self, index: int) -> dict:
        where = self.records.where(index)
        messages = field(self.records[index], "messages", list, where)
        problem = validate_conversation(messages)
        if problem:
            raise TaskDataError(f"{where}: {problem}")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
