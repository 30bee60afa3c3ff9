"""MMLU's and ARC's answers (tasks.multiple_choice, tasks.arc): the question as lettered options, the
answer as its letter, the letter a completion picks, and the rows refused; exact texts, since the
model is trained and scored on them.

Builds conversations directly (one ARC file of three rows goes through the real loader), so the file
runs in seconds (tests/mutation.py runs it per mutant)."""

from __future__ import annotations

import json
import string

import pytest

from tasks import ARC, MMLU
from tasks.base import TaskDataError
from tasks.multiple_choice import MultipleChoiceTask, multiple_choice_conversation


def test_the_prompt_lists_the_options_by_letter_and_asks_for_one():
    conversation = multiple_choice_conversation("  Which is blue?\n", ["grass", "sky", "sun", "snow"], 1, "row 0")
    assert conversation == {
        "messages": [
            {"role": "user", "content": "Which is blue?\n\nA. grass\nB. sky\nC. sun\nD. snow\n\n"
                                        "Answer with the letter of the correct option (A, B, C or D)."},
            {"role": "assistant", "content": "B"},
        ],
        "letters": ["A", "B", "C", "D"],
    }


def test_two_choices_are_a_or_b_and_twenty_six_go_to_z():
    two = multiple_choice_conversation("q", ["no", "yes"], 0, "r")
    assert two["messages"][0]["content"] == "q\n\nA. no\nB. yes\n\nAnswer with the letter of the correct option (A or B)."
    assert two["messages"][1]["content"] == "A" and two["letters"] == ["A", "B"]
    many = multiple_choice_conversation("q", [f"c{i}" for i in range(26)], 25, "r")
    assert many["letters"] == list(string.ascii_uppercase) and many["messages"][1]["content"] == "Z"
    assert many["messages"][0]["content"].endswith("\nZ. c25\n\nAnswer with the letter of the correct option "
                                                   "(" + ", ".join(string.ascii_uppercase[:-1]) + " or Z).")


@pytest.mark.parametrize("choices, answer, message", [
    (["only"], 0, "row 7: expected 2 to 26 choices, got 1"),
    ([f"c{i}" for i in range(27)], 0, "row 7: expected 2 to 26 choices, got 27"),
    (["a", 2], 0, "row 7: every choice must be a string, got ['a', 2]"),
    (["a", "b", "c"], 3, "row 7: answer 3 is not one of the 3 choices"),
    (["a", "b", "c"], -1, "row 7: answer -1 is not one of the 3 choices"),
])
def test_a_row_that_cannot_be_a_question_is_refused_naming_it(choices, answer, message):
    with pytest.raises(TaskDataError) as err:
        multiple_choice_conversation("q", choices, answer, "row 7")
    assert str(err.value) == message


def test_the_last_answer_and_the_first_are_accepted():
    assert multiple_choice_conversation("q", ["a", "b", "c"], 2, "r")["messages"][1]["content"] == "C"
    assert multiple_choice_conversation("q", ["a", "b", "c"], 0, "r")["messages"][1]["content"] == "A"


@pytest.mark.parametrize("completion, score", [("C", 1), ("c", 1), (" C\n", 1), ("B", 0), ("CC", 0), ("C.", 0), ("", 0)])
def test_a_completion_scores_when_it_is_the_answers_letter(completion, score):
    conversation = multiple_choice_conversation("q", ["a", "b", "c", "d"], 2, "r")
    assert MultipleChoiceTask.evaluate(None, conversation, completion) == score
    assert MultipleChoiceTask.eval_type == "categorical"


def arc_rows(tmp_path, rows) -> ARC:
    path = tmp_path / "arc.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return ARC("ARC-Easy", "test", path=path)


def test_arc_letters_options_in_their_order_and_its_key_follows_its_label(tmp_path):
    task = arc_rows(tmp_path, [
        {"question": "Which?", "answerKey": "2", "choices": {"text": ["w", "x", "y"], "label": ["3", "2", "1"]}},
        {"question": "Odd labels", "answerKey": "b", "choices": {"text": ["p", "q"], "label": ["a", "b"]}},
        {"question": "Mismatch", "answerKey": "A", "choices": {"text": ["p", "q", "r"], "label": ["A", "B"]}},
    ])
    first = task[0]
    assert first["messages"][0]["content"].startswith("Which?\n\nA. w\nB. x\nC. y\n\n")
    assert first["messages"][1]["content"] == "B" and first["letters"] == ["A", "B", "C"]
    assert task[1]["messages"][1]["content"] == "B"
    with pytest.raises(TaskDataError) as err:
        task[2]
    assert str(err.value).endswith("row 2 (counting from 0): answerKey 'A' must be one of the labels ['A', 'B'], "
                                   "one label per choice text (3 texts)")


def test_mmlu_takes_its_answer_index_and_subject(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    rows = [{"question": "q", "subject": "law", "choices": ["a", "b", "c", "d"], "answer": 3},
            {"question": "q", "choices": ["a", "b"], "answer": 0}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    task = MMLU(path=path)
    assert task[0]["messages"][1]["content"] == "D" and task[0]["subject"] == "law"
    assert task[1]["subject"] == ""


GOOD_ARC = {"question": "q", "answerKey": "A", "choices": {"text": ["p", "q"], "label": ["A", "B"]}}


@pytest.mark.parametrize("row, names", [
    ({**GOOD_ARC, "choices": None}, "'choices'"),
    ({**GOOD_ARC, "choices": {"text": None, "label": ["A", "B"]}}, "'text'"),
    ({**GOOD_ARC, "choices": {"text": ["p", "q"], "label": None}}, "'label'"),
    ({**GOOD_ARC, "answerKey": None}, "'answerKey'"),
    ({**GOOD_ARC, "question": None}, "'question'"),
    ({**GOOD_ARC, "choices": {"text": ["p"], "label": ["A"]}}, "expected 2 to 26 choices, got 1"),
])
def test_a_broken_arc_row_is_refused_naming_the_row_and_what_is_wrong(tmp_path, row, names):
    task = arc_rows(tmp_path, [GOOD_ARC, row])
    assert task[0]["messages"][1]["content"] == "A"
    with pytest.raises(TaskDataError) as err:
        task[1]
    where = f"{tmp_path / 'arc.jsonl'} row 1 (counting from 0)"
    assert str(err.value).startswith(where) and names in str(err.value)


def test_arc_defaults_to_the_easy_test_split_and_takes_a_slice(tmp_path, monkeypatch):
    # the task-data folder holds a file per subset and split: the defaults pick ARC-Easy's test file
    (tmp_path / "arc-ARC-Easy-test.jsonl").write_text("".join(json.dumps(GOOD_ARC) + "\n" for _ in range(3)), encoding="utf-8")
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(tmp_path))
    assert len(ARC()) == 3
    assert len(ARC(stop=2)) == 2
