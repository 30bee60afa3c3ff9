"""Spelling drills generated from an English word list, to teach letter-level skills.

SimpleSpelling: "Spell the word: apple" -> "apple:a,p,p,l,e".
SpellingBee: "How many 'r' are there in strawberry?" -> the word spelled out,
a calculator call 'strawberry'.count('r') and its output, then "The answer is 3.".

The word list is dwyl/english-words' words_alpha.txt, downloaded once to
$NANOCHAT_BASE_DIR/words_alpha.txt; words.txt in the task-data folder
($NANOCHAT_TASK_DATA, tasks.hub) or path= name another list, one word a line.
Each word belongs to train or test by a hash of the word, so test words never
appear in training. Example i is the same for the same (size, split, seed) on
every machine.
"""

from __future__ import annotations

import functools
import hashlib
import random
import string
from pathlib import Path

from nanochat.common import get_base_dir
from nanochat.download import DownloadError, download_file
from tasks.answers import same_final_number
from tasks.base import Task, TaskDataError
from tasks.hub import TASK_DATA_ENV, task_data_file

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
WORDS_FILE = "words_alpha.txt"
LOCAL_FILE = "words.txt"  # its name in the task-data folder
SPLITS = ("train", "test")
TEST_BUCKETS = 10  # one word in ten is a test word
LETTER_FROM_WORD_PROBABILITY = 0.7  # otherwise any letter, often one the word lacks (answer 0)
BEE_QUESTIONS = (
    "How many '{letter}' are there in {word}?",
    "How many times does the letter {letter} appear in the word {word}?",
    "Count the letter '{letter}' in \"{word}\".",
    "In the word {word}, how many {letter}'s are there?",
    "how many {letter} in {word}",
)


def words_path(path: str | Path | None = None) -> Path:
    """The word list: `path`, else the task-data folder's words.txt, else the downloaded default."""
    if path:
        return Path(path).expanduser()
    local = task_data_file(LOCAL_FILE)
    if local is not None:
        return local
    try:
        return download_file(WORDS_URL, get_base_dir() / WORDS_FILE, retries=3, backoff=1.0)
    except DownloadError as exc:
        raise TaskDataError(f"could not download the word list ({exc}); put a list (one word a line) at "
                            f"{get_base_dir() / WORDS_FILE}, or pass path= or put {LOCAL_FILE} in ${TASK_DATA_ENV}") from exc


def is_test_word(word: str) -> bool:
    # sha256 rather than hash(): Python salts str hashes per process
    return int(hashlib.sha256(word.encode("utf-8")).hexdigest()[:8], 16) % TEST_BUCKETS == 0


@functools.lru_cache(maxsize=4)
def split_words(path: Path, split: str) -> tuple[str, ...]:
    """The distinct lowercase a-z words of `path` that belong to `split`, sorted."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskDataError(f"{path}: cannot read the word list ({exc})") from None
    words = {line.strip().lower() for line in lines}
    chosen = sorted(w for w in words if w.isascii() and w.isalpha() and is_test_word(w) == (split == "test"))
    if not chosen:
        raise TaskDataError(f"{path}: no {split} words (a-z only, one a line) in the word list")
    return tuple(chosen)


class _WordTask(Task):
    """`size` examples, example i built from a word drawn by a generator seeded with (seed, split, i)."""

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 42, path: str | Path | None = None, **slicing):
        super().__init__(**slicing)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative integer, got {size!r}")
        self.size, self.split, self.seed = size, split, seed
        self.words = split_words(words_path(path), split)

    def num_examples(self) -> int:
        return self.size

    def _generator(self, index: int) -> random.Random:
        # a str seed is hashed with sha512, the same on every platform and Python version
        return random.Random(f"{type(self).__name__}:{self.seed}:{self.split}:{index}")


def spelled(word: str) -> str:
    return f"{word}:{','.join(word)}"


class SimpleSpelling(_WordTask):
    def get_example(self, index: int) -> dict:
        word = self._generator(index).choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": spelled(word)},
        ]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        return int("".join(completion.split()) == conversation["messages"][-1]["content"])


class SpellingBee(_WordTask):
    def get_example(self, index: int) -> dict:
        rng = self._generator(index)
        word = rng.choice(self.words)
        pool = word if rng.random() < LETTER_FROM_WORD_PROBABILITY else string.ascii_lowercase
        letter = rng.choice(pool)
        count = word.count(letter)
        question = rng.choice(BEE_QUESTIONS).format(letter=letter, word=word)
        answer = [
            {"type": "text", "text": f"Spelled out, {word} is {spelled(word)}\n\nCounting '{letter}' with Python: "},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nThe answer is {count}."},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 when the completion's final number is the count."""
        return same_final_number(conversation, completion)
