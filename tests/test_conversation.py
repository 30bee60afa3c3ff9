"""The conversation format's one definition: shown text <-> parts, structure checks, and the
transformers chat template written from the same tables."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanochat import conversation as conv

# shown text never holds the markers' own characters inside a part
plain = st.text(alphabet=st.characters(blacklist_characters="<>=", blacklist_categories=("Cs",)), min_size=1, max_size=20)


@st.composite
def assistant_parts(draw):
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            parts += [{"type": "python", "text": draw(plain)}, {"type": "python_output", "text": draw(plain)}]
        elif not parts or parts[-1]["type"] != "text":  # two text parts in a row read back as one
            parts.append({"type": "text", "text": draw(plain)})
    return parts


@given(assistant_parts())
def test_parts_survive_being_shown_and_read_back(parts):
    shown = conv.shown_text(parts)
    back = conv.parts_from_shown(shown)
    if all(part["type"] == "text" for part in parts):
        assert back == shown  # no tool call: the plain string
    else:
        assert back == parts


def test_a_calculator_call_reads_as_gsm8k_writes_it():
    parts = [{"type": "text", "text": "So "}, {"type": "python", "text": "4+5"}, {"type": "python_output", "text": "9"},
             {"type": "text", "text": ". #### 9"}]
    assert conv.shown_text(parts) == "So <<4+5=9>>. #### 9"
    assert conv.calculator_results("#### <<4+5=9>>") == "####  9 "


def test_shown_markers_are_what_shown_text_puts_around_each_part():
    markers = conv.shown_markers()
    parts = [{"type": "python", "text": "e"}, {"type": "python_output", "text": "r"}]
    python, output = conv.PART_TOKENS["python"], conv.PART_TOKENS["python_output"]
    as_tokens = markers[python[0]] + "e" + markers[python[1]] + markers[output[0]] + "r" + markers[output[1]]
    assert as_tokens == conv.shown_text(parts)


def test_every_special_token_is_defined_once_and_the_tool_call_does_not_end_an_answer():
    assert len(set(conv.SPECIAL_TOKENS)) == len(conv.SPECIAL_TOKENS) == 9
    assert conv.END_OF_ANSWER in conv.SPECIAL_TOKENS and conv.END_OF_ANSWER not in conv.TOOL_CALL_TOKENS
    assert set(conv.TOOL_CALL_TOKENS) < set(conv.SPECIAL_TOKENS)


@pytest.mark.parametrize("conversation, problem", [
    ([], "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ([{"role": "user"}], "message 0: must be a dict"),
    ([{"role": "tool", "content": "a"}], "message 0: unknown role 'tool'"),
    ([{"role": "user", "content": 3}], "message 0: user content must be a string, got int"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "message 1: each content part"),
    ([{"role": "system", "content": "s"}], "a system message must be followed by a user message"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "a system message must be followed"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user', expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
     "message 2 has role 'system', expected 'user'"),
])
def test_structure_problems_name_the_message_and_what_is_wrong(conversation, problem):
    assert problem in conv.structure_problem(conversation)


def test_well_formed_conversations_pass_and_system_joins_the_first_user_turn():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert conv.structure_problem({"messages": messages}) is None
    assert conv.structure_problem(messages[1:2]) is None  # a prompt: ends on the user
    folded = conv.fold_system(messages)
    assert folded == [{"role": "user", "content": "be brief\n\nhi"}, messages[2]]
    assert messages[0]["role"] == "system"  # the input is left alone


def test_the_chat_template_is_built_from_the_token_tables():
    template = conv.chat_template()
    for name in conv.SPECIAL_TOKENS:
        assert f"'{name}'" in template
    # the tool's output is the one part outside a generation block: the model is not trained on it
    output_start = conv.PART_TOKENS["python_output"][0]
    line = next(line for line in template.splitlines() if output_start in line)
    assert "generation" not in line
    python_line = next(line for line in template.splitlines() if conv.PART_TOKENS["python"][0] in line)
    assert "{%- generation -%}" in python_line


@pytest.mark.parametrize("conversation, problem", [
    (["role and content"], "message 0: must be a dict with 'role' and 'content', got 'role and content'"),
    ([{"content": "a"}], "message 0: must be a dict with 'role' and 'content', got {'content': 'a'}"),
    ([{"role": "tool", "content": "a"}], "message 0: unknown role 'tool' (expected one of system, user, assistant)"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}],
     "message 1: each content part must be {'type': one of text, python, python_output, 'text': str}, "
     "got {'type': 'code', 'text': 'x'}"),
    ([{"role": "assistant", "content": "a"}], "message 0 has role 'assistant', expected 'user' (user and assistant "
     "alternate, starting with user; a system message may only come first)"),
])
def test_structure_problems_read_in_full(conversation, problem):
    # the renderer's ValueError and a task file's bad-row error say these: someone fixes the data from them
    assert conv.structure_problem(conversation) == problem


def test_system_messages_anywhere_join_in_order_into_one_leading_one():
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "a"}, {"role": "assistant", "content": "yo"},
                {"role": "system", "content": "b"}, {"role": "user", "content": "again"}]
    assert conv.gather_system(messages) == [{"role": "system", "content": "a\n\nb"}, *[m for m in messages if m["role"] != "system"]]
    assert conv.gather_system(messages[:1]) == messages[:1]
