"""Custom conversations from a JSONL file, such as the model's identity ("who made you?").

Each line is {"messages": [...]}: an optional system message, then user and
assistant alternating. The default file is
$NANOCHAT_BASE_DIR/identity_conversations.jsonl; one of that name in the
task-data folder ($NANOCHAT_TASK_DATA, tasks.hub) comes first, and path=
overrides both. The whole file is checked when loaded, and the first bad line
is an error naming the file and line.
"""

from __future__ import annotations

from pathlib import Path

from nanochat.common import get_base_dir
from tasks.base import Task, TaskDataError, validate_conversation
from tasks.hub import TASK_DATA_ENV, task_data_file
from tasks.records import field, read_json_lines

DEFAULT_FILE = "identity_conversations.jsonl"

__all__ = ["CustomJSON", "default_identity_path", "validate_conversation"]


def default_identity_path() -> Path:
    return task_data_file(DEFAULT_FILE) or get_base_dir() / DEFAULT_FILE


class CustomJSON(Task):
    def __init__(self, path: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        path = Path(path).expanduser() if path is not None else default_identity_path()
        if not path.exists():
            raise TaskDataError(f"{path}: no such file; write one {{\"messages\": [...]}} object per line "
                                f"there, or pass path= (or put one in ${TASK_DATA_ENV}) to use another file")
        if not path.is_file():
            raise TaskDataError(f"{path}: not a file; the conversations are one JSON lines file")
        self.conversations = [_checked_conversation(where, row) for where, row in read_json_lines(path)]

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]


def _checked_conversation(where: str, row: dict) -> dict:
    messages = field(row, "messages", list, where)
    problem = validate_conversation(messages)
    if problem:
        raise TaskDataError(f"{where}: {problem}")
    return {"messages": messages}
