"""The model's calculator tool: arithmetic and a few string methods, nothing else.

The expression is parsed with `ast` and evaluated by walking a whitelist of
node types: numbers and strings, + - * / // % **, unary +/-, and calls of a
few string methods on strings (`'strawberry'.count('r')`). No names, no other
attributes, no comprehensions, lambdas, subscripts or imports exist here.

Every operation checks the size of what it would produce *before* producing
it (digits of a power, length of a repeated string), so evaluation is bounded
in time and memory without signals or subprocesses; that keeps it usable from
any thread, such as a web server's workers. Anything unsafe, malformed or
failing gives None, never an exception.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_SOURCE_CHARS = 500
MAX_NODES = 100
MAX_DIGITS = 100  # integers beyond 10^100 are refused
MAX_STRING = 10_000
STRING_METHODS = {
    "count", "upper", "lower", "strip", "replace", "startswith", "endswith", "find", "title", "capitalize",
}
BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class Refused(Exception):
    """The expression is outside what the calculator evaluates."""


def evaluate(source: str) -> str | None:
    """The result of `source` as text, or None when it is refused or fails."""
    if not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS:
        return None
    try:
        tree = ast.parse(source.strip(), mode="eval")
        if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
            return None
        return format_result(_eval(tree.body))
    except (Refused, SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError):
        return None


def format_result(value) -> str:
    if isinstance(value, bool) or isinstance(value, (int, str)):
        return str(value)
    if not math.isfinite(value):
        raise Refused("not a finite number")
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.10g}"


def _eval(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return _checked(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _eval(node.left), _eval(node.right)
        _check_cost(node.op, left, right)
        return _checked(BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        operand = _eval(node.operand)
        if isinstance(operand, str):
            raise Refused("unary operator on a string")
        return UNARY[type(node.op)](operand)
    if isinstance(node, ast.Call):
        return _call_string_method(node)
    raise Refused(f"{type(node).__name__} is not allowed")


def _call_string_method(node: ast.Call):
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr in STRING_METHODS) or node.keywords:
        raise Refused("only string methods may be called")
    target = _eval(func.value)
    args = [_eval(a) for a in node.args]
    if not isinstance(target, str) or len(args) > 3:
        raise Refused("string methods apply to strings")
    if func.attr == "replace" and len(args) >= 2 and isinstance(args[1], str):
        growth = target.count(args[0]) * len(args[1]) if isinstance(args[0], str) and args[0] else len(target) * len(args[1])
        if len(target) + growth > MAX_STRING:
            raise Refused("result too long")
    return _checked(getattr(target, func.attr)(*args))


def _check_cost(op, left, right) -> None:
    """Refuse operations whose result would be huge, before computing them."""
    if isinstance(op, ast.Pow):
        if isinstance(left, str) or isinstance(right, str):
            raise Refused("power of a string")
        if abs(left) > 1 and right > 0 and right * math.log10(abs(left)) > MAX_DIGITS:
            raise Refused("power too large")
    if isinstance(op, ast.Mult) and (isinstance(left, str) or isinstance(right, str)):
        text, times = (left, right) if isinstance(left, str) else (right, left)
        if not isinstance(times, int) or len(text) * max(times, 0) > MAX_STRING:
            raise Refused("repeated string too long")
    if isinstance(op, ast.Mod) and (isinstance(left, str) or isinstance(right, str)):
        raise Refused("string formatting")


def _checked(value):
    if isinstance(value, complex):
        raise Refused("complex result")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**MAX_DIGITS:
        raise Refused("integer too large")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise Refused("string too long")
    return value
