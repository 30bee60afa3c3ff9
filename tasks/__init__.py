"""Datasets for midtraining, SFT, RL and evaluation, all behind one interface (tasks.base.Task).

The Hub's datasets load through `datasets.load_dataset` (tasks.hub: its cache,
offline mode, token). Every loader takes path= (a local parquet / jsonl / json
file, or a folder of one of those, with the Hub's columns; loaded by the same
call) and reads an environment variable that does the same, so nothing needs
the network once the data is on disk:

    SmolTalk(split)              NANOCHAT_SMOLTALK_PATH    chat conversations
    MMLU(subset, split)          NANOCHAT_MMLU_PATH        multiple choice, categorical
    ARC(subset, split)           NANOCHAT_ARC_PATH         multiple choice, categorical
    GSM8K(split, subset="main")  NANOCHAT_GSM8K_PATH       math with calculator calls
    HumanEval()                  NANOCHAT_HUMANEVAL_PATH   Python functions, run against tests
    CustomJSON(path)             NANOCHAT_IDENTITY_PATH    your own conversations (JSONL)
    SimpleSpelling / SpellingBee NANOCHAT_WORDS_PATH       generated from a word list
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
