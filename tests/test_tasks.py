"""tasks/: slicing and mixtures, every loader on small files in the Hub's schema, rendering, scorers,
local files through `datasets`, the Hub's offline errors, identity-file errors, and the spelling generators.

No network: local files go through the real `datasets.load_dataset`; the Hub is a closed local port or offline mode.
"""

from __future__ import annotations

import itertools
import json
import socket
import sys
import time
import types

import pyarrow as pa
import pyarrow.parquet as pq
import datasets
import pytest

from nanochat.tokenizer import Tokenizer
from tasks import (
    ARC, GSM8K, MMLU, CustomJSON, HubUnavailable, HumanEval, SimpleSpelling, SmolTalk, SpellingBee,
    Task, TaskDataError, TaskMixture, TaskSequence, validate_conversation,
)
from tasks import spelling
from nanochat.conversation import shown_text
from tasks.answers import final_number, same_final_number


# ---------------------------------------------------------------- helpers


class Numbers(Task):
    """Example i is a conversation whose user message is `name` and i."""

    def __init__(self, name: str, size: int, **slicing):
        super().__init__(**slicing)
        self.name, self.size = name, size

    def num_examples(self):
        return self.size

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.name} {index}"}, {"role": "assistant", "content": "ok"}]}


def ids_of(task) -> list[str]:
    return [example["messages"][0]["content"] for example in task]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def chat(*contents, system=None):
    roles = ["user", "assistant"] * len(contents)
    messages = [{"role": role, "content": text} for role, text in zip(roles, contents)]
    return ([{"role": "system", "content": system}] if system else []) + messages


@pytest.fixture(scope="module")
def tokenizer():
    words = "the clips sold natalia april may half print count apples answer python".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i * 37 % 1000}" for i in range(300)]
    return Tokenizer.train_from_iterator(texts, vocab_size=320)


# ---------------------------------------------------------------- slicing, sequences, mixtures


def test_slicing_honours_start_stop_step_and_negative_indices():
    task = Numbers("n", 10, start=1, stop=8, step=3)
    assert ids_of(task) == ["n 1", "n 4", "n 7"]
    assert len(task) == 3 and task[-1] == task[2]
    with pytest.raises(IndexError):
        task[3]
    assert len(Numbers("n", 5, start=7)) == 0
    assert len(Numbers("n", 5, stop=50)) == 5


@pytest.mark.parametrize("bad", [{"start": -1}, {"step": 0}, {"stop": -2}, {"start": 1.5}])
def test_slicing_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        Numbers("n", 5, **bad)


def test_sequence_concatenates_and_repeats_a_task_listed_twice():
    a, b = Numbers("a", 2), Numbers("b", 3, start=1)
    assert ids_of(TaskSequence([a, b, a])) == ["a 0", "a 1", "b 1", "b 2", "a 0", "a 1"]
    assert ids_of(TaskSequence([Numbers("e", 0), a])) == ["a 0", "a 1"]
    with pytest.raises(ValueError):
        TaskSequence([])


def test_mixture_covers_every_example_once_in_a_seed_fixed_order():
    tasks = [Numbers("a", 5), Numbers("b", 3), Numbers("c", 4)]
    mixed = ids_of(TaskMixture(tasks, seed=7))
    assert sorted(mixed) == sorted(ids_of(TaskSequence(tasks)))
    assert mixed == ids_of(TaskMixture(tasks, seed=7))
    assert mixed != ids_of(TaskMixture(tasks, seed=8))
    assert mixed != ids_of(TaskSequence(tasks))


def test_mixture_order_is_pinned_across_machines():
    # numpy keeps RandomState's stream frozen; pinning the order makes any change show up
    order = ids_of(TaskMixture([Numbers("a", 3), Numbers("b", 3)], seed=42))
    assert order == ["a 0", "a 1", "b 2", "a 2", "b 1", "b 0"]


def test_mixture_repeats_and_slices_like_any_task():
    identity = Numbers("id", 2)
    mixture = TaskMixture([identity, identity, Numbers("x", 4)], seed=1, stop=5)
    full = ids_of(TaskMixture([identity, identity, Numbers("x", 4)], seed=1))
    assert full.count("id 0") == 2 and full.count("id 1") == 2
    assert ids_of(mixture) == full[:5]


# ---------------------------------------------------------------- SmolTalk


def test_smoltalk_reads_parquet_with_optional_system_message(tmp_path):
    rows = [{"messages": chat("hi", "hello!")}, {"messages": chat("2+2?", "4", "thanks", "welcome", system="be brief")}]
    path = write_parquet(tmp_path / "train.parquet", rows)
    task = SmolTalk("train", path=path)
    assert len(task) == 2
    assert task[0] == {"messages": chat("hi", "hello!")}
    assert task[1]["messages"][0] == {"role": "system", "content": "be brief"}


def test_smoltalk_malformed_row_names_file_and_row(tmp_path):
    bad = [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "hm"}]
    path = write_parquet(tmp_path / "train.parquet", [{"messages": chat("a", "b")}, {"messages": bad}])
    task = SmolTalk("train", path=path)
    with pytest.raises(TaskDataError, match=r"train\.parquet row 1 \(counting from 0\): .*role 'assistant'"):
        task[1]


def test_the_task_data_folder_serves_each_split_by_its_conventional_name(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "smoltalk-test.jsonl", [{"messages": chat("test q", "a")}])
    write_jsonl(tmp_path / "smoltalk-train" / "part-0.jsonl", [{"messages": chat("train q", "a")}])  # a folder of files
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(tmp_path))
    assert SmolTalk("test")[0]["messages"][0]["content"] == "test q"
    assert SmolTalk("train")[0]["messages"][0]["content"] == "train q"
    write_parquet(tmp_path / "smoltalk-test.parquet", [{"messages": chat("other", "a")}])
    with pytest.raises(TaskDataError, match=r"both smoltalk-test\.parquet and smoltalk-test\.jsonl"):
        SmolTalk("test")
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(tmp_path / "missing"))
    with pytest.raises(TaskDataError, match=r"missing \(from \$NANOCHAT_TASK_DATA\) is not a folder"):
        SmolTalk("test")


def test_folder_of_files_is_read_in_name_order_one_format_only(tmp_path):
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"messages": chat("third", "x")}])
    write_jsonl(tmp_path / "d" / "a.json", [{"messages": chat("first", "x")}, {"messages": chat("second", "x")}])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    assert ids_of(SmolTalk("train", path=tmp_path / "d")) == ["first", "second", "third"]
    write_parquet(tmp_path / "d" / "c.parquet", [{"messages": chat("fourth", "x")}])
    with pytest.raises(TaskDataError, match="mixes parquet and JSON"):
        SmolTalk("train", path=tmp_path / "d")


def test_json_array_and_unreadable_files(tmp_path):
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"messages": chat("q", "a")}]))
    assert len(SmolTalk("train", path=array)) == 1
    broken = tmp_path / "rows.jsonl"
    broken.write_text(json.dumps({"messages": chat("q", "a")}) + "\n\n{not json\n")
    with pytest.raises(TaskDataError, match=r"rows\.jsonl: not readable as JSON lines .*JSON parse error"):
        SmolTalk("train", path=broken)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(TaskDataError, match=r"fake\.parquet: not readable as parquet"):
        SmolTalk("train", path=tmp_path / "fake.parquet")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TaskDataError, match=r"empty\.jsonl: the file is empty"):
        SmolTalk("train", path=tmp_path / "empty.jsonl")


def test_local_files_go_through_the_datasets_cache_and_a_changed_file_is_read_again(tmp_path, base_dir):
    path = write_jsonl(tmp_path / "smol.jsonl", [{"messages": chat("old", "x")}])
    assert ids_of(SmolTalk("train", path=path)) == ["old"]
    assert list((base_dir / "datasets").glob("json/*")), "load_dataset's Arrow cache under $NANOCHAT_BASE_DIR/datasets"
    write_jsonl(path, [{"messages": chat("new", "x")}, {"messages": chat("newer", "x")}])
    assert ids_of(SmolTalk("train", path=path)) == ["new", "newer"]


# ---------------------------------------------------------------- MMLU and ARC


MMLU_ROW = {"question": "What is 2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1}


def test_mmlu_renders_lettered_options_and_letter_answer(tmp_path):
    task = MMLU("all", "test", path=write_parquet(tmp_path / "mmlu.parquet", [MMLU_ROW]))
    assert task.eval_type == "categorical"
    example = task[0]
    user, assistant = example["messages"]
    assert user["content"].startswith("What is 2+2?\n\nA. 3\nB. 4\nC. 5\nD. 22\n\n")
    assert "letter" in user["content"]
    assert assistant == {"role": "assistant", "content": "B"}
    assert example["letters"] == ["A", "B", "C", "D"] and example["subject"] == "elementary_mathematics"
    assert task.evaluate(example, "B") == 1 and task.evaluate(example, " b\n") == 1
    assert task.evaluate(example, "A") == 0 and task.reward(example, "B") == 1.0


def test_mmlu_auxiliary_train_layout_and_bad_answer(tmp_path):
    path = write_parquet(tmp_path / "aux.parquet", [{"train": MMLU_ROW}, {"train": {**MMLU_ROW, "answer": 4}}])
    task = MMLU("auxiliary_train", "train", path=path)
    assert task[0]["messages"][1]["content"] == "B"
    with pytest.raises(TaskDataError, match=r"aux\.parquet row 1 .*answer 4"):
        task[1]
    with pytest.raises(ValueError, match="auxiliary_train"):
        MMLU("auxiliary_train", "test", path=path)


def test_arc_normalises_numeric_and_letter_labels(tmp_path):
    rows = [
        {"id": "x1", "question": "Which is a gas?", "answerKey": "3",
         "choices": {"text": ["rock", "water", "steam", "ice"], "label": ["1", "2", "3", "4"]}},
        {"id": "x2", "question": "Pick E.", "answerKey": "E",
         "choices": {"text": ["a", "b", "c", "d", "e"], "label": ["A", "B", "C", "D", "E"]}},
        {"id": "x3", "question": "Broken", "answerKey": "F", "choices": {"text": ["a", "b"], "label": ["A", "B"]}},
    ]
    task = ARC("ARC-Challenge", "test", path=write_jsonl(tmp_path / "arc.jsonl", rows))
    first, second = task[0], task[1]
    assert "\nC. steam\n" in first["messages"][0]["content"] and first["messages"][1]["content"] == "C"
    assert second["letters"] == ["A", "B", "C", "D", "E"] and second["messages"][1]["content"] == "E"
    assert task.evaluate(first, "C") == 1 and task.evaluate(first, "3") == 0
    with pytest.raises(TaskDataError, match=r"arc\.jsonl row 2 \(counting from 0\): answerKey 'F'"):
        task[2]


def test_missing_field_names_row_and_field(tmp_path):
    task = MMLU(path=write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "choices": ["a", "b"]}]))
    with pytest.raises(TaskDataError, match=r"m\.jsonl row 0 \(counting from 0\): missing field 'answer'"):
        task[0]


# ---------------------------------------------------------------- GSM8K


GSM_ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


@pytest.fixture
def gsm8k(tmp_path):
    return GSM8K("train", path=write_parquet(tmp_path / "gsm8k.parquet", [GSM_ROW, {**GSM_ROW, "answer": "Easy.\n#### 1,000"}]))


def test_gsm8k_turns_calculator_annotations_into_tool_parts(gsm8k):
    assert gsm8k.eval_type == "generative"
    user, assistant = gsm8k[0]["messages"]
    assert user == {"role": "user", "content": GSM_ROW["question"]}
    assert assistant["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]


def test_gsm8k_tool_call_is_trained_and_tool_output_is_not(gsm8k, tokenizer):
    ids, mask = tokenizer.render_conversation(gsm8k[0])
    special = tokenizer.get_special_tokens()

    def spans(start, end):
        starts = [i for i, t in enumerate(ids) if t == special[start]]
        return [(s, ids.index(special[end], s)) for s in starts]

    calls, outputs = spans("<|python_start|>", "<|python_end|>"), spans("<|output_start|>", "<|output_end|>")
    assert len(calls) == len(outputs) == 2
    for s, e in calls:
        assert set(mask[s : e + 1]) == {1}
        assert tokenizer.decode(ids[s + 1 : e]) in ("48/2", "48+24")
    for s, e in outputs:
        assert set(mask[s : e + 1]) == {0}
        assert tokenizer.decode(ids[s + 1 : e]) in ("24", "72")
    user_end = ids.index(special["<|user_end|>"])
    assert set(mask[: user_end + 2]) == {0}  # bos, the question, user_end and assistant_start
    assert mask[-1] == 1 and ids[-1] == special["<|assistant_end|>"]


@pytest.mark.parametrize("completion, correct", [
    ("She sold 24 in May, so 72 in total.\n#### 72", 1),
    ("#### 72.0", 1),
    ("The total is 72.", 1),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May and <<48+24=72>>72 in all.", 1),
    ("#### <<48+24=72>>", 1),
    ("#### 72 ... no wait, it was 71", 1),  # the marked answer wins over later numbers
    ("#### 71", 0),
    ("She sold <<48/2=24>>24 clips.", 0),
    ("I don't know.", 0),
    ("#### 7,200", 0),
])
def test_gsm8k_scorer(gsm8k, completion, correct):
    assert gsm8k.evaluate(gsm8k[0], completion) == correct
    assert gsm8k.reward(gsm8k[0], completion) == float(correct)


def test_gsm8k_scorer_normalises_commas(gsm8k):
    assert gsm8k.evaluate(gsm8k[1], "#### 1000") == 1
    assert gsm8k.evaluate(gsm8k[1], "That makes 1,000.") == 1
    assert gsm8k.evaluate(gsm8k[1], "#### 1,001") == 0
    assert final_number("3,4") == 4 and final_number("-1,234.50") == final_number("-1234.5")


def test_reference_with_a_tool_call_reads_as_the_engine_shows_it():
    # the reference is scored against what the engine prints, so both must spell a tool call alike
    parts = [{"type": "text", "text": "So "}, {"type": "python", "text": "4+5"},
             {"type": "python_output", "text": "9"}, {"type": "text", "text": ". #### 9"}]
    assert shown_text(parts) == "So <<4+5=9>>. #### 9"
    # the reference is the last message, not the second: a system message comes first here
    conversation = {"messages": [{"role": "system", "content": "Be brief. 7"}, {"role": "user", "content": "4+5? 3"},
                                 {"role": "assistant", "content": parts}]}
    assert same_final_number(conversation, "<<4+5=9>>") == 1 and same_final_number(conversation, "#### 3") == 0
    with pytest.raises(ValueError, match="holds no number"):
        same_final_number({"messages": [{"role": "assistant", "content": "none"}]}, "1")


def test_gsm8k_answer_without_final_line_is_an_error(tmp_path):
    task = GSM8K("test", path=write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no final line"}]))
    with pytest.raises(TaskDataError, match=r"g\.jsonl row 0 .*####"):
        task[0]


# ---------------------------------------------------------------- HumanEval


HE_ROW = {
    "task_id": "HumanEval/0",
    "prompt": "from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    \"\"\"Sum of xs.\"\"\"\n",
    "canonical_solution": "    return sum(xs)\n",
    "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n",
    "entry_point": "add",
}


@pytest.fixture
def fake_execution(monkeypatch):
    """tasks.execution stand-in that runs programs in-process and remembers them."""
    programs = []

    def execute(program, timeout):
        programs.append(program)
        try:
            exec(program, {})
        except Exception:
            return types.SimpleNamespace(passed=False)
        return types.SimpleNamespace(passed=True)

    monkeypatch.setitem(sys.modules, "tasks.execution", types.SimpleNamespace(execute=execute))
    return programs


def test_humaneval_renders_function_request_and_fenced_solution(tmp_path):
    example = HumanEval(path=write_jsonl(tmp_path / "he.jsonl", [HE_ROW]))[0]
    user, assistant = example["messages"]
    assert HE_ROW["prompt"] in user["content"]
    assert assistant["content"] == "```python\n" + (HE_ROW["prompt"] + HE_ROW["canonical_solution"]).rstrip() + "\n```"
    assert example["entry_point"] == "add"


def test_humaneval_scores_by_running_the_tests(tmp_path, fake_execution):
    task = HumanEval(path=write_parquet(tmp_path / "he.parquet", [HE_ROW]))
    example = task[0]
    assert task.evaluate(example, example["messages"][1]["content"]) == 1
    program = fake_execution[-1]
    assert program.rstrip().endswith("check(add)") and "```" not in program
    raw = "def add(xs: List[int]) -> int:\n    return sum(xs)\n"
    assert task.evaluate(example, raw) == 1  # unfenced; List comes from the prompt's imports
    two_blocks = "Example:\n```python\nprint(1)\n```\nAnswer:\n```python\ndef add(xs):\n    return 0\n```"
    assert task.evaluate(example, two_blocks) == 0
    assert "return 0" in fake_execution[-1] and "print(1)" not in fake_execution[-1]
    cut_off = "```python\ndef add(xs):\n    return sum(xs)\n"
    assert task.evaluate(example, cut_off) == 1


# ---------------------------------------------------------------- identity conversations


def test_custom_json_loads_conversations(tmp_path):
    rows = [{"messages": chat("who are you?", "nanochat")}, {"messages": chat("hi", "hey", system="sys")}]
    task = CustomJSON(write_jsonl(tmp_path / "id.jsonl", rows))
    assert len(task) == 2 and task[0] == rows[0]


def test_custom_json_default_path_is_in_base_dir(base_dir):
    write_jsonl(base_dir / "identity_conversations.jsonl", [{"messages": chat("q", "a")}])
    assert len(CustomJSON()) == 1


@pytest.mark.parametrize("line, problem", [
    ("{oops", "not valid JSON"),
    ('{"conversation": []}', "missing field 'messages'"),
    (json.dumps({"messages": chat("a", "b", "c", "d")[1:]}), "role 'assistant', expected 'user'"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}), "expected 'assistant'"),
    (json.dumps({"messages": chat("a", "  ")}), "message 1: content is empty"),
    (json.dumps({"messages": chat("a")}), "at least one user and one assistant"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "unknown role 'bot'"),
])
def test_custom_json_errors_name_the_line(tmp_path, line, problem):
    good = json.dumps({"messages": chat("q", "a")})
    path = tmp_path / "id.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(TaskDataError, match=rf"id\.jsonl line 3: .*{problem}"):
        CustomJSON(path)


def test_custom_json_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(TaskDataError, match="nope.jsonl: no such file.*path="):
        CustomJSON(tmp_path / "nope.jsonl")


def test_validate_conversation_accepts_tool_parts():
    parts = [{"type": "text", "text": "2+3 is "}, {"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"}]
    assert validate_conversation(chat("sum?", "x")[:1] + [{"role": "assistant", "content": parts}]) is None
    assert "part" in validate_conversation(chat("sum?", "x")[:1] + [{"role": "assistant", "content": [{"type": "code", "text": ""}]}])
    assert validate_conversation([]) is not None and validate_conversation("hi") is not None


# ---------------------------------------------------------------- spelling


@pytest.fixture
def words(tmp_path):
    vocabulary = ["".join(letters) + "ing" for letters in itertools.product("bcdfghjklm", "aeiou", "prstvwxyz")][:400]
    path = tmp_path / "words.txt"
    path.write_text("\n".join(vocabulary + ["Strawberry", "strawberry", "don't", "", "naïve"]) + "\n")
    return path


def test_spelling_is_deterministic_and_seeded(words):
    first = [SimpleSpelling(50, "train", path=words)[i] for i in range(50)]
    assert first == list(SimpleSpelling(50, "train", path=words))
    assert first != list(SimpleSpelling(50, "train", seed=1, path=words))
    assert list(SpellingBee(30, "test", path=words)) == list(SpellingBee(30, "test", path=words))
    assert len(SpellingBee(30, "test", path=words, start=10)) == 20


def test_spelling_train_and_test_words_are_disjoint(words):
    train, test = spelling.split_words(words, "train"), spelling.split_words(words, "test")
    assert train and test and not set(train) & set(test)
    assert len(set(train) | set(test)) == 400 + 1  # cleaned: lowercase a-z only, deduplicated
    for split, pool in (("train", train), ("test", test)):
        for example in SimpleSpelling(40, split, path=words):
            assert example["messages"][1]["content"].split(":")[0] in pool


def test_simple_spelling_format(words):
    task = SimpleSpelling(5, "train", path=words)
    example = task[0]
    word = example["messages"][0]["content"].removeprefix("Spell the word: ")
    assert example["messages"][1]["content"] == f"{word}:{','.join(word)}"
    assert task.evaluate(example, f"{word}: {', '.join(word)}") == 1
    assert task.evaluate(example, f"{word}:x") == 0


def test_spelling_bee_counts_with_a_tool_call_and_scores_the_final_number(words, tokenizer):
    task = SpellingBee(60, "train", path=words)
    counts = set()
    for example in task:
        parts = example["messages"][1]["content"]
        call, output = parts[1]["text"], parts[2]["text"]
        word, letter = call.split("'")[1], call.split("'")[3]
        assert word in example["messages"][0]["content"] and output == str(word.count(letter))
        assert parts[-1]["text"].endswith(f"The answer is {output}.")
        counts.add(word.count(letter))
        assert tokenizer.render_conversation(example)[0]
    assert 0 in counts and len(counts) > 1
    example = task[0]
    count = int(example["messages"][1]["content"][2]["text"])
    assert task.evaluate(example, f"Counting: <<'x'.count('y')={count}>>\n\nThe answer is {count}.") == 1
    assert task.evaluate(example, f"The answer is {count + 1}.") == 0


def test_word_list_default_is_downloaded_once(words, base_dir, monkeypatch):
    monkeypatch.setattr(spelling, "WORDS_URL", words.as_uri())
    assert len(SimpleSpelling(3, "test")) == 3
    assert (base_dir / "words_alpha.txt").read_text() == words.read_text()


# ---------------------------------------------------------------- the Hub


def closed_port_url() -> str:
    with socket.socket() as s:  # bound, then closed: connecting there is refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_hub_fails_in_seconds_naming_dataset_and_local_file_options(monkeypatch):
    # datasets itself retries an unreachable Hub for half a minute; the probe makes that a cache-only load
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", closed_port_url())
    started = time.monotonic()
    with pytest.raises(HubUnavailable) as err:
        MMLU("all", "test")
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert "cais/mmlu" in message and "'all'" in message and "'test'" in message and "is unreachable" in message
    assert "not in the cache" in message and "path=" in message and "mmlu-all-test.jsonl" in message
    assert "$NANOCHAT_TASK_DATA" in message
    assert datasets.config.HF_HUB_OFFLINE is False  # cache-only for that one load, not for the process


def test_offline_mode_reads_only_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets when datasets is imported
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://nanochat-hub.invalid")  # never asked
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(tmp_path))  # a task-data folder without GSM8K: on to the Hub's cache
    with pytest.raises(HubUnavailable, match=r"openai/gsm8k .*offline mode is on .*gsm8k-main-test\.jsonl"):
        GSM8K("test")
    assert datasets.config.HF_HUB_OFFLINE is True
