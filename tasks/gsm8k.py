"""GSM8K (openai/gsm8k): grade-school math word problems, for SFT, RL and evaluation.

Subset "main" (or "socratic"), splits "train" (~7.5K) and "test" (~1.3K).
Columns: question, answer. The answer's calculator annotations <<expr=result>>
become tool-call parts, so the model learns to call its calculator: the text
before, {"type": "python", "text": expr}, {"type": "python_output", "text": result},
and so on; the last line "#### N" stays in the text as the final answer.
"""

from __future__ import annotations

from pathlib import Path

from nanochat.conversation import parts_from_shown
from tasks.answers import MARKED_RE, same_final_number
from tasks.base import TaskDataError
from tasks.hub import HubTask
from tasks.records import field

REPO = "openai/gsm8k"
class GSM8K(HubTask):
    repo = REPO
    local_name = "gsm8k-{subset}-{split}"
    splits = {subset: ("train", "test") for subset in ("main", "socratic")}

    def __init__(self, split: str = "test", subset: str = "main", path: str | Path | None = None, **slicing):
        super().__init__(subset, split, path, **slicing)

    def get_example(self, index: int) -> dict:
        where = self.records.where(index)
        row = self.records[index]
        question, answer = field(row, "question", str, where), field(row, "answer", str, where)
        if not MARKED_RE.search(answer):
            raise TaskDataError(f"{where}: the answer has no final '#### N' line")
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts_from_shown(answer)}]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 when the completion's final number (after its last ####, else its last number) is the reference's."""
        return same_final_number(conversation, completion)
