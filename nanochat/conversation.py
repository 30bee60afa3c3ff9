"""The conversation format, defined once: the tokenizer, the engine, the tasks,
the identity-data tool and the exported transformers chat template all use it.

A conversation is {"messages": [...]} or the list itself. Each message is
{"role", "content"}; roles are system, user, assistant. An optional system
message comes first and is folded into the first user turn when rendered;
then user and assistant alternate, starting with user. Assistant content is a
string or a list of parts {"type", "text"}, the types below.

As tokens (PART_TOKENS, TURN_TOKENS): <|bos|>, then per user turn
<|user_start|> text <|user_end|>, per assistant turn <|assistant_start|>
parts <|assistant_end|>, where a "python" part is <|python_start|> expr
<|python_end|> (the model calling its calculator) and a "python_output" part
is <|output_start|> result <|output_end|> (what the tool answered). The model
is trained on its own tokens only: assistant text, calculator calls and
<|assistant_end|>, never on user turns or tool outputs.

As text (what the chat surfaces show, and GSM8K's own annotation): a call and
its result read <<expr=result>>; `shown_text` writes that form and
`parts_from_shown` reads it back into parts.
"""

from __future__ import annotations

import re

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")

BOS = "<|bos|>"
# role -> (opening, closing) special token of its turn; a system message has none (it joins the first user turn)
TURN_TOKENS = {"user": ("<|user_start|>", "<|user_end|>"), "assistant": ("<|assistant_start|>", "<|assistant_end|>")}
# part type -> (opening, closing) special token, or None for plain text, and whether the model is trained on it
PART_TOKENS = {
    "text": (None, None, True),
    "python": ("<|python_start|>", "<|python_end|>", True),
    "python_output": ("<|output_start|>", "<|output_end|>", False),
}
SPECIAL_TOKENS = (
    BOS,
    *TURN_TOKENS["user"],
    *TURN_TOKENS["assistant"],
    *PART_TOKENS["python"][:2],
    *PART_TOKENS["python_output"][:2],
)
# An answer ends with <|assistant_end|>: generation stops there.
END_OF_ANSWER = TURN_TOKENS["assistant"][1]
# The special tokens a model may emit inside an answer without ending it: its calculator call.
TOOL_CALL_TOKENS = PART_TOKENS["python"][:2]

# part type -> what stands before and after its text when shown: <<expr=result>>
SHOWN = {"text": ("", ""), "python": ("<<", "="), "python_output": ("", ">>")}
TOOL_CALL_RE = re.compile(r"<<([^<>=]+)=([^<>]*)>>")


def shown_markers() -> dict[str, str]:
    """Special token -> the text it reads as when an answer is shown (the engine streams these)."""
    markers = {}
    for kind in ("python", "python_output"):
        opening, closing, _ = PART_TOKENS[kind]
        markers[opening], markers[closing] = SHOWN[kind]
    return markers


def shown_text(content: str | list[dict]) -> str:
    """Assistant content as the chat surfaces show it: a calculator call and its result as <<expr=result>>."""
    if isinstance(content, str):
        return content
    return "".join(SHOWN[part["type"]][0] + part["text"] + SHOWN[part["type"]][1] for part in content)


def parts_from_shown(text: str) -> str | list[dict]:
    """The inverse of shown_text: an answer as shown back into parts (the plain string when it calls
    no tool), so a multi-turn chat re-renders what the model produced."""
    parts, last = [], 0
    for m in TOOL_CALL_RE.finditer(text):
        if m.start() > last:
            parts.append({"type": "text", "text": text[last : m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        parts.append({"type": "python_output", "text": m.group(2)})
        last = m.end()
    if not parts:
        return text
    if last < len(text):
        parts.append({"type": "text", "text": text[last:]})
    return parts


def calculator_results(text: str) -> str:
    """Shown text with each <<expr=result>> replaced by its result (what a reader takes as the number written)."""
    return TOOL_CALL_RE.sub(lambda m: f" {m.group(2)} ", text)


# ---------------------------------------------------------------- structure


def messages_of(conversation) -> list:
    return conversation.get("messages") if isinstance(conversation, dict) else conversation


def message_problem(message) -> str | None:
    """What is wrong with one message's shape (role, content type, parts), or None."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        return f"must be a dict with 'role' and 'content', got {message!r}"
    role, content = message["role"], message["content"]
    if role not in ROLES:
        return f"unknown role {role!r} (expected one of {', '.join(ROLES)})"
    if role == "assistant" and isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                return f"each content part must be {{'type': one of {', '.join(PART_TYPES)}, 'text': str}}, got {part!r}"
        return None
    if not isinstance(content, str):
        return f"{role} content must be a string, got {type(content).__name__}"
    return None


def order_problem(messages: list[dict]) -> str | None:
    """What is wrong with the order of well-shaped messages, or None: system only first, then user and
    assistant alternating from the user."""
    offset = 1 if messages and messages[0]["role"] == "system" else 0
    if offset and (len(messages) < 2 or messages[1]["role"] != "user"):
        return "a system message must be followed by a user message"
    for i, message in enumerate(messages[offset:], start=offset):
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if message["role"] != expected:
            return (f"message {i} has role {message['role']!r}, expected {expected!r} (user and assistant "
                    "alternate, starting with user; a system message may only come first)")
    return None


def structure_problem(conversation) -> str | None:
    """The first problem with a conversation's shape and order, or None when it can be rendered."""
    messages = messages_of(conversation)
    if not isinstance(messages, (list, tuple)) or not messages:
        return "a conversation must be a non-empty list of messages or {'messages': [...]}"
    for i, message in enumerate(messages):
        problem = message_problem(message)
        if problem:
            return f"message {i}: {problem}"
    return order_problem(list(messages))


def gather_system(messages: list[dict]) -> list[dict]:
    """Messages with every system message's text joined, in order, into one leading system message:
    the OpenAI API takes several anywhere (agents add theirs), the format holds one (a new list)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + rest


def fold_system(messages: list[dict]) -> list[dict]:
    """Well-ordered messages with a leading system message joined to the first user turn (a new list)."""
    if messages[0]["role"] != "system":
        return list(messages)
    merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [merged, *messages[2:]]


# ---------------------------------------------------------------- the transformers chat template


def chat_template() -> str:
    """The Jinja chat template for transformers, written from the definitions above.

    It renders a conversation to the same ids as Tokenizer.render_conversation,
    and with add_generation_prompt to those of render_for_completion. Its
    {% generation %} blocks cover exactly the tokens the model is trained on,
    so return_assistant_tokens_mask equals our loss mask. Every tag trims the
    whitespace around it: only the quoted strings and contents reach the output.
    """
    (user_start, user_end), (assistant_start, assistant_end) = TURN_TOKENS["user"], TURN_TOKENS["assistant"]
    part_branches = []
    for kind in ("python", "python_output"):
        opening, closing, trained = PART_TOKENS[kind]
        body = "{{- '" + opening + "' + part['text'] + '" + closing + "' -}}"
        part_branches.append((kind, _generation(body) if trained else body))
    text_body = _generation("{{- part['text'] -}}") if PART_TOKENS["text"][2] else "{{- part['text'] -}}"
    return f"""
{{%- if messages and messages[0]['role'] == 'system' -%}}
    {{%- if messages | length < 2 or messages[1]['role'] != 'user' -%}}
        {{{{- raise_exception('a system message must be followed by a user message') -}}}}
    {{%- endif -%}}
    {{%- set system_prefix = messages[0]['content'] + '\\n\\n' -%}}
    {{%- set turns = messages[1:] -%}}
{{%- else -%}}
    {{%- set system_prefix = '' -%}}
    {{%- set turns = messages -%}}
{{%- endif -%}}
{{{{- '{BOS}' -}}}}
{{%- for message in turns -%}}
    {{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}}
        {{{{- raise_exception('roles must alternate user, assistant, user, ... starting with user (a system message may only come first)') -}}}}
    {{%- endif -%}}
    {{%- if message['role'] == 'user' -%}}
        {{{{- '{user_start}' + (system_prefix if loop.first else '') + message['content'] + '{user_end}' -}}}}
    {{%- else -%}}
        {{{{- '{assistant_start}' -}}}}
        {{%- if message['content'] is string -%}}
            {_generation("{{- message['content'] -}}")}
        {{%- else -%}}
            {{%- for part in message['content'] -%}}
                {{%- if part['type'] == '{part_branches[0][0]}' -%}}
                    {part_branches[0][1]}
                {{%- elif part['type'] == '{part_branches[1][0]}' -%}}
                    {part_branches[1][1]}
                {{%- else -%}}
                    {text_body}
                {{%- endif -%}}
            {{%- endfor -%}}
        {{%- endif -%}}
        {_generation("{{- '" + assistant_end + "' -}}")}
    {{%- endif -%}}
{{%- endfor -%}}
{{%- if add_generation_prompt -%}}
    {{{{- '{assistant_start}' -}}}}
{{%- endif -%}}
"""


def _generation(body: str) -> str:
    return "{%- generation -%}" + body + "{%- endgeneration -%}"
