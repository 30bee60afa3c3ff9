"""Custom conversations from a JSONL file, such as the model's identity ("who made you?").

Each line is {"messages": [...]}: an optional system message, then user and
assistant alternating. The default file is
$NANOCHAT_BASE_DIR/identity_conversations.jsonl ($NANOCHAT_IDENTITY_PATH or
path= point elsewhere). The whole file is checked when loaded, and the first
bad line is an error naming the file and line.
"""

from __future__ import annotations

import os
from pathlib import Path

from nanochat.common import get_base_dir
from tasks.base import Task, TaskDataError, validate_conversation
from tasks.records import data_files, field, read_records

ENV_VAR = "NANOCHAT_IDENTITY_PATH"
DEFAULT_FILE = "identity_conversations.jsonl"

__all__ = ["CustomJSON", "default_identity_path", "validate_conversation"]


def default_identity_path() -> Path:
    override = os.environ.get(ENV_VAR)
    return Path(override).expanduser() if override else get_base_dir() / DEFAULT_FILE


class CustomJSON(Task):
    def __init__(self, path: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        path = Path(path).expanduser() if path is not None else default_identity_path()
        if not path.exists():
            raise TaskDataError(f"{path}: no such file; write one {{\"messages\": [...]}} object per line "
                                f"there, or pass path= (or set {ENV_VAR}) to use another file")
        records = read_records(data_files(path))
        self.conversations = [_checked_conversation(records, i) for i in range(len(records))]

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]


def _checked_conversation(records, index: int) -> dict:
    where = records.where(index)
    messages = field(records[index], "messages", list, where)
    problem = validate_conversation(messages)
    if problem:
        raise TaskDataError(f"{where}: {problem}")
    return {"messages": messages}
