"""The calculator tool: what it computes, and everything it refuses without raising."""

from __future__ import annotations

import threading
import time
import tracemalloc

import pytest

from nanochat.calculator import evaluate


@pytest.mark.parametrize("expr,expected", [
    ("1+2*3", "7"), ("48/2", "24"), ("7/2", "3.5"), ("1/3", "0.3333333333"), ("2**10", "1024"),
    ("-5 + +3", "-2"), ("17 // 5", "3"), ("17 % 5", "2"), ("(1.5+2.5)*3", "12"), ("  12 * 12  ", "144"),
    ("'strawberry'.count('r')", "3"), ("'Hello'.upper()", "HELLO"), ("'a,b'.replace(',', ';')", "a;b"),
    ("'abc'.startswith('a')", "True"), ("'ab' * 3", "ababab"), ("2 ** -2", "0.25"), ("10**99", "1" + "0" * 99),
    ("1" * 100, "1" * 100), ("\t1+1\n", "2"),
])
def test_computes(expr, expected):
    assert evaluate(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os')", "__import__('os').system('echo hi')", "().__class__", "().__class__.__bases__[0].__subclasses__()",
    "open('/etc/passwd').read()", "x", "len('abc')", "'a'.__class__", "'abc'.count", "[1, 2, 3]", "{1: 2}",
    "(lambda: 1)()", "[x for x in range(10)]", "1 if True else 2", "1 < 2", "a = 1", "import os", "exec('1')",
    "'%s' % 5", "'x'.format(1)", "'abc'[0]", "'abc'.count(x='a')", "-'a'", "2 ** 'a'",
])
def test_refuses_unsafe_or_unsupported(expr):
    assert evaluate(expr) is None


@pytest.mark.parametrize("expr", [
    "9**9**9", "10**101", "(10**60) * (10**60)", "'a' * 10**9", "10**9 * 'ab'", "'ab'.replace('', 'x' * 5000)",
    "1/0", "1 % 0", "(-8) ** 0.5", "10.0 ** 400", "1e308 * 10", "1" * 600, "-" * 300 + "1", "1 +", "", "'unterminated",
])
def test_refuses_huge_failing_or_malformed(expr):
    assert evaluate(expr) is None


@pytest.mark.parametrize("value", [None, 123, b"1+1", "\x00", "ü" * 10, "1" * 499, "１+１"],
                         ids=["none", "int", "bytes", "nul", "a-name", "499-digits", "full-width-digits"])
def test_odd_input_is_refused_not_raised(value):
    assert evaluate(value) is None


def test_bounded_and_usable_off_the_main_thread():
    results = {}

    def work():
        t0 = time.perf_counter()
        results["value"] = [evaluate("9**9**9"), evaluate("'ab' * 5000"), evaluate("3*7")]
        results["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert results["value"][0] is None and len(results["value"][1]) == 10_000 and results["value"][2] == "21"
    assert results["seconds"] < 1.0


# the limits at their edges: one step inside is computed, one step outside refused
@pytest.mark.parametrize("expr,expected", [
    ("1+1".ljust(500), "2"), ("1+1".ljust(501), None),  # MAX_SOURCE_CHARS
    ("1" + "+1" * 31 + "+-1", "31"), ("1" + "+1" * 33, None),  # 100 and 101 nodes (MAX_NODES)
    ("9" * 100, "9" * 100), ("10**100", None),  # the largest integer allowed has 100 digits
    ("'aaa'.replace('a', 'b', 2)", "bba"),  # string methods take up to 3 arguments
    ("'ab'.replace('a')", None),  # too few arguments: refused, not an IndexError in the size check
    # replace's size estimate counts the matches, so a long text with one match may grow; 10,000 is allowed
    ("('x' * 9000 + 'a').replace('a', 'bb')", "x" * 9000 + "bb"), ("('a' * 100).replace('a', 'b' * 99)", "b" * 9900),
    ("999999999999999.0", "999999999999999"), ("1e15", "1e+15"),  # floats print as integers below 10^15 only
])
def test_limits_at_their_edges(expr, expected):
    assert evaluate(expr) == expected


def test_a_method_on_a_number_is_refused_not_raised():
    # getattr(5, "count") would raise AttributeError, which evaluate() does not catch
    assert evaluate("(5).count(5)") is None


@pytest.mark.parametrize("expr", [
    "('a' * 5000).replace('a', 'b' * 5000)", "('a' * 5000).replace('', 'x' * 5000)", "'a' * 10**8", "10**8 * 'a'", "2 ** 10**7", "(10**99) ** 9000",
])
def test_huge_results_are_refused_before_they_are_built(expr):
    # the result would be refused afterwards anyway; what the size checks buy is never allocating it
    # (25-100 MB for the strings, 0.4-1.2 MB for the powers), so memory is measured, not the answer alone
    tracemalloc.start()
    try:
        assert evaluate(expr) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200_000
