"""Datasets for midtraining, SFT, RL and evaluation, all behind one interface (tasks.base.Task).

The Hub's datasets load through `datasets.load_dataset` (tasks.hub: its cache,
offline mode, token). Every loader takes path= (a local parquet / jsonl / json
file, or a folder of one of those, with the Hub's columns; loaded by the same
call), and looks first in the task-data folder that $NANOCHAT_TASK_DATA names,
under the name below (a .parquet, .jsonl or .json suffix, or a folder of that
name), so nothing needs the network once the data is on disk:

    SmolTalk(split)              smoltalk-{split}                chat conversations
    MMLU(subset, split)          mmlu-{subset}-{split}           multiple choice, categorical
    ARC(subset, split)           arc-{subset}-{split}            multiple choice, categorical
    GSM8K(split, subset="main")  gsm8k-{subset}-{split}          math with calculator calls
    HumanEval()                  humaneval                       Python functions, run against tests
    CustomJSON(path)             identity_conversations.jsonl    your own conversations (JSONL)
    SimpleSpelling / SpellingBee words.txt                       generated from a word list

`python -m tasks.sample_data DIR` writes a folder with every one of them.
"""

from tasks.arc import ARC
from tasks.base import Task, TaskDataError, TaskMixture, TaskSequence, validate_conversation
from tasks.gsm8k import GSM8K
from tasks.hub import HubUnavailable
from tasks.humaneval import HumanEval
from tasks.identity import CustomJSON
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spelling import SimpleSpelling, SpellingBee

__all__ = [
    "ARC", "GSM8K", "MMLU", "CustomJSON", "HubUnavailable", "HumanEval", "SimpleSpelling", "SmolTalk",
    "SpellingBee", "Task", "TaskDataError", "TaskMixture", "TaskSequence", "validate_conversation",
]
