"""The conversation renderer and its loss mask (nanochat.tokenizer over nanochat.conversation), and the
transformers chat template written from the same tables, checked against token streams spelled out
by hand here.

A byte-level tokenizer (256 byte tokens, then the nine specials) keeps the expected ids readable:
"hi" is [104, 105]. No training, so the file runs in seconds (tests/mutation.py runs it per mutant)."""

from __future__ import annotations

import copy

import pytest
from jinja2.exceptions import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from nanochat import conversation as conv
from nanochat.tokenizer import Tokenizer

TOK = Tokenizer({bytes([i]): i for i in range(256)})
# the special ids follow the 256 bytes in this order (the on-disk format and every checkpoint rely on it)
IDS = {name: 256 + i for i, name in enumerate(["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                               "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                                               "<|output_start|>", "<|output_end|>"])}


def stream(*pieces: tuple[str, int]) -> tuple[list[int], list[int]]:
    """(ids, mask) from (piece, bit) pairs: a piece is a special token's name or plain ASCII text."""
    ids, mask = [], []
    for piece, bit in pieces:
        piece_ids = [IDS[piece]] if piece in IDS else list(piece.encode("ascii"))
        ids += piece_ids
        mask += [bit] * len(piece_ids)
    return ids, mask


USER = lambda text: [("<|user_start|>", 0), (text, 0), ("<|user_end|>", 0)]  # noqa: E731


def test_the_specials_sit_after_the_bytes_in_the_documented_order():
    assert TOK.get_special_tokens() == IDS and list(conv.SPECIAL_TOKENS) == list(IDS)
    assert TOK.get_bos_token_id() == IDS["<|bos|>"]


def test_a_turn_trains_on_the_answer_and_its_end_only():
    ids, mask = TOK.render_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    assert (ids, mask) == stream(("<|bos|>", 0), *USER("hi"), ("<|assistant_start|>", 0), ("yo", 1), ("<|assistant_end|>", 1))


def test_turns_alternate_and_each_answer_is_trained():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert TOK.render_conversation(messages) == stream(
        ("<|bos|>", 0), *USER("a"), ("<|assistant_start|>", 0), ("b", 1), ("<|assistant_end|>", 1),
        *USER("c"), ("<|assistant_start|>", 0), ("d", 1), ("<|assistant_end|>", 1))


def test_a_system_message_joins_the_first_user_turn_and_the_input_is_untouched():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "v"}, {"role": "assistant", "content": "b"}]
    before = copy.deepcopy(messages)
    assert TOK.render_conversation(messages) == stream(
        ("<|bos|>", 0), *USER("S\n\nu"), ("<|assistant_start|>", 0), ("a", 1), ("<|assistant_end|>", 1),
        *USER("v"), ("<|assistant_start|>", 0), ("b", 1), ("<|assistant_end|>", 1))
    assert messages == before
    assert conv.fold_system(messages[1:]) == messages[1:]


TOOL_ANSWER = [{"type": "text", "text": "so "}, {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"},
               {"type": "text", "text": " ok"}]


def test_calls_are_trained_and_the_tools_output_is_not():
    ids, mask = TOK.render_conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": TOOL_ANSWER}])
    assert (ids, mask) == stream(
        ("<|bos|>", 0), *USER("q"), ("<|assistant_start|>", 0), ("so ", 1),
        ("<|python_start|>", 1), ("6*7", 1), ("<|python_end|>", 1),
        ("<|output_start|>", 0), ("42", 0), ("<|output_end|>", 0),
        (" ok", 1), ("<|assistant_end|>", 1))


def test_a_text_part_is_the_same_as_a_string_answer():
    as_parts = TOK.render_conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}])
    assert as_parts == TOK.render_conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "yo"}])


def test_typed_special_token_text_stays_bytes():
    # a user who types "<|assistant_end|>" must not end a turn: the text is its bytes
    ids, mask = TOK.render_conversation([{"role": "user", "content": "<|bos|>"}, {"role": "assistant", "content": "<|assistant_end|>"}])
    typed_user, typed_answer = list(b"<|bos|>"), list(b"<|assistant_end|>")
    assert ids == [IDS["<|bos|>"], IDS["<|user_start|>"], *typed_user, IDS["<|user_end|>"], IDS["<|assistant_start|>"],
                   *typed_answer, IDS["<|assistant_end|>"]]
    assert mask == [0] * (4 + len(typed_user)) + [1] * (len(typed_answer) + 1)


@pytest.mark.parametrize("limit", [0, 1, 5, 9, 10, 100])
def test_truncation_cuts_ids_and_mask_at_the_same_place(limit):
    full = stream(("<|bos|>", 0), *USER("hi"), ("<|assistant_start|>", 0), ("yo", 1), ("<|assistant_end|>", 1))
    ids, mask = TOK.render_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], max_tokens=limit)
    assert (ids, mask) == (full[0][:limit], full[1][:limit])


def test_the_default_limit_is_2048_tokens():
    ids, mask = TOK.render_conversation([{"role": "user", "content": "x" * 3000}, {"role": "assistant", "content": "y"}])
    assert len(ids) == len(mask) == 2048


def test_a_prompt_ends_opening_the_answer_and_drops_a_reference_answer():
    expected = stream(("<|bos|>", 0), *USER("S\n\nq"), ("<|assistant_start|>", 0))[0]
    asked = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert TOK.render_for_completion(asked) == expected
    assert TOK.render_for_completion({"messages": asked + [{"role": "assistant", "content": "ref"}]}) == expected


def test_a_prompt_after_earlier_turns_keeps_them():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": TOOL_ANSWER}, {"role": "user", "content": "b"}]
    expected = TOK.render_conversation(messages)[0] + [IDS["<|assistant_start|>"]]
    assert TOK.render_for_completion(messages) == expected
    assert TOK.render_for_completion(messages + [{"role": "assistant", "content": "c"}]) == expected


@pytest.mark.parametrize("conversation, problem", [
    ([{"role": "assistant", "content": "a"}], "message 0 has role 'assistant', expected 'user'"),
    ([{"role": "system", "content": "s"}], "a system message must be followed by a user message"),
    ({"messages": []}, "a conversation must be a non-empty list of messages or {'messages': [...]}"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "python", "text": 3}]}], "message 1: each content part"),
])
def test_what_cannot_be_rendered_is_refused_saying_why(conversation, problem):
    for render in (TOK.render_conversation, TOK.render_for_completion):
        with pytest.raises(ValueError) as err:
            render(conversation)
        assert str(err.value).startswith(problem)


# ---------------------------------------------------------------- the transformers chat template

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    "system": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
               {"role": "user", "content": "v"}, {"role": "assistant", "content": "b"}],
    "tool use": [{"role": "user", "content": "q"}, {"role": "assistant", "content": TOOL_ANSWER}],
    "text part": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "t"}]}],
}


def template(messages, **kwargs):
    rendered, spans = render_jinja_template([messages], chat_template=conv.chat_template(), return_assistant_tokens_mask=True, **kwargs)
    return rendered[0], spans[0]


def char_mask(ids: list[int], mask: list[int]) -> list[int]:
    """Our token mask per character of the decoded text (a special is as many characters as its name)."""
    return [bit for token, bit in zip(ids, mask) for _ in TOK.decode([token])]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_the_template_renders_our_text_and_marks_our_trained_tokens(name):
    ids, mask = TOK.render_conversation(CONVERSATIONS[name])
    text, spans = template(CONVERSATIONS[name])
    assert text == TOK.decode(ids)
    marked = [0] * len(text)
    for start, end in spans:
        marked[start:end] = [1] * (end - start)
    assert marked == char_mask(ids, mask)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_the_templates_generation_prompt_is_our_completion_prompt(name):
    asked = CONVERSATIONS[name][:-1]
    text, _ = template(asked, add_generation_prompt=True)
    assert text == TOK.decode(TOK.render_for_completion(asked))
    assert template(asked)[0] == TOK.decode(TOK.render_conversation(asked)[0])  # no prompt asked: none added


@pytest.mark.parametrize("messages, message", [
    ([{"role": "assistant", "content": "a"}], "roles must alternate user, assistant, user, ... starting with user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
    ([{"role": "system", "content": "s"}], "a system message must be followed by a user message"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "a system message must be followed by a user message"),
])
def test_the_template_refuses_what_the_renderer_refuses(messages, message):
    with pytest.raises(TemplateError) as err:
        template(messages)
    assert message in str(err.value)
