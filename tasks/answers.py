"""Scoring answers that end in a number (GSM8K, SpellingBee).

The final answer is the number after the last "####", or failing that the
last number in the text. Completions come from the engine, which shows tool
calls inline as <<expr=result>>; each is read as its result, so "#### <<4+5=9>>"
still answers 9. "1,000", "1000" and "1000.0" are the same answer.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from nanochat.conversation import calculator_results, shown_text

# Commas only between groups of three digits, so "3,4" is two numbers, not 34.
NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
NUMBER_RE = re.compile(NUMBER)
MARKED_RE = re.compile(r"####\s*\$?\s*(" + NUMBER + ")")


def final_number(text: str) -> Decimal | None:
    """The answer `text` ends on, or None when it holds no number."""
    plain = calculator_results(text)
    marked = MARKED_RE.findall(plain)
    candidates = marked or NUMBER_RE.findall(plain)
    if not candidates:
        return None
    try:
        return Decimal(candidates[-1].replace(",", ""))
    except InvalidOperation:
        return None


def same_final_number(conversation: dict, completion: str) -> int:
    """1 when `completion` ends on the number the reference (last) assistant message ends on."""
    expected = final_number(shown_text(conversation["messages"][-1]["content"]))
    if expected is None:
        raise ValueError("the reference answer holds no number to compare against")
    return int(final_number(completion) == expected)
