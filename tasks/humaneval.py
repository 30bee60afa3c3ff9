"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, scored by their tests.

Split "test". Columns: task_id, prompt (signature and docstring),
canonical_solution (the body), test (defines check(candidate)), entry_point.
The reference answer is the whole function in a ```python block. A completion
passes when its code, run with the tests in a sandboxed process
(tasks.execution), makes check(<entry point>) return without error.
"""

from __future__ import annotations

import re
from pathlib import Path

from tasks.hub import HubTask
from tasks.records import field

REPO = "openai/openai_humaneval"
TIMEOUT_S = 10.0
# A fenced block, possibly cut off by the token limit before its closing fence.
FENCED_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
IMPORT_RE = re.compile(r"^(?:import|from)\s.*$", re.MULTILINE)


class HumanEval(HubTask):
    repo = REPO
    local_name = "humaneval"
    splits = {"openai_humaneval": ("test",)}

    def __init__(self, path: str | Path | None = None, **slicing):
        super().__init__("openai_humaneval", "test", path, **slicing)

    def get_example(self, index: int) -> dict:
        where = self.records.where(index)
        row = self.records[index]
        prompt = field(row, "prompt", str, where)
        solution = prompt + field(row, "canonical_solution", str, where)
        request = f"Complete this Python function:\n\n```python\n{prompt}```"
        return {
            "messages": [
                {"role": "user", "content": request},
                {"role": "assistant", "content": f"```python\n{solution.rstrip()}\n```"},
            ],
            "task_id": row.get("task_id", ""),
            "prompt": prompt,
            "test": field(row, "test", str, where),
            "entry_point": field(row, "entry_point", str, where),
        }

    def evaluate(self, conversation: dict, completion: str) -> int:
        from tasks.execution import execute  # imported here: sandboxing is only needed when scoring

        entry_point = conversation["entry_point"]
        program = "\n".join([
            *IMPORT_RE.findall(conversation["prompt"]),  # the prompt's imports, which answers often leave out
            extract_code(completion, entry_point),
            conversation["test"],
            f"check({entry_point})",
        ])
        return int(execute(program, timeout=TIMEOUT_S).passed)


def extract_code(completion: str, entry_point: str) -> str:
    """The fenced block that defines `entry_point` (else the first block); the raw text when unfenced."""
    blocks = FENCED_RE.findall(completion)
    if not blocks:
        return completion
    defining = [block for block in blocks if f"def {entry_point}" in block]
    return (defining or blocks)[0]
