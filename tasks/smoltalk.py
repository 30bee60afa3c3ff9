"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for midtraining and SFT.

Splits: "train" (~460K conversations) and "test" (~24K). Column `messages`:
a list of {role, content}. Rows are checked when read; a malformed one is an
error naming its file and row, never silently skipped.
"""

from __future__ import annotations

from pathlib import Path

from tasks.base import TaskDataError, validate_conversation
from tasks.hub import HubTask
from tasks.records import field

REPO = "HuggingFaceTB/smol-smoltalk"
class SmolTalk(HubTask):
    repo = REPO
    local_name = "smoltalk-{split}"
    splits = {"default": ("train", "test")}

    def __init__(self, split: str = "train", path: str | Path | None = None, **slicing):
        super().__init__("default", split, path, **slicing)

    def get_example(self, index: int) -> dict:
        where = self.records.where(index)
        messages = field(self.records[index], "messages", list, where)
        problem = validate_conversation(messages)
        if problem:
            raise TaskDataError(f"{where}: {problem}")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
