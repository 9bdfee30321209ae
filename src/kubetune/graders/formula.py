"""A multi grader's ``calculate_output``: arithmetic over sub-grader names, checked against a whitelist of
syntax and evaluated without ``eval``.

Allowed: numbers, sub-grader names, + - * /, ** and ^ (both power, with power's precedence: ^ is read
as **, as a formula means it, not as Python's xor), unary minus, parentheses, and min, max, abs, sqrt,
log, exp, floor, ceil. Everything is computed in floats, so a power costs constant time (Python's
integers would compute 9**9**9 digit by digit); a constant exponent above MAX_EXPONENT is refused up
front all the same, as it can only overflow.
"""

from __future__ import annotations

import ast
import math
import operator

from kubetune.graders.errors import GraderError

MAX_LENGTH = 1000
MAX_EXPONENT = 64
FUNCTIONS = {"min": (min, 1, None), "max": (max, 1, None), "abs": (abs, 1, 1), "sqrt": (math.sqrt, 1, 1),
             "log": (math.log, 1, 2), "exp": (math.exp, 1, 1), "floor": (math.floor, 1, 1),
             "ceil": (math.ceil, 1, 1)}  # name: (function, fewest, most arguments)
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.Pow: operator.pow}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
PARAM = "calculate_output"


def parse(formula: str, names: set[str]) -> ast.expr:
    """The checked syntax tree of ``formula``; GraderError naming what is not allowed."""
    if len(formula) > MAX_LENGTH:
        raise GraderError(f"longer than {MAX_LENGTH} characters", PARAM)
    try:
        tree = ast.parse(formula.strip().replace("^", "**"), mode="eval").body
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        raise GraderError(f"not a formula: {formula!r}", PARAM) from None
    _check(tree, names)
    return tree


def _check(node: ast.AST, names: set[str]) -> None:
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise GraderError(f"{node.value!r} is not a number", PARAM)
    elif isinstance(node, ast.Name):
        if node.id not in names:
            known = ", ".join(sorted(names)) or "none"
            raise GraderError(f"refers to {node.id!r}, which is not one of the graders ({known})",
                              PARAM)
    elif isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        _check(node.left, names)
        _check(node.right, names)
        if isinstance(node.op, ast.Pow):
            _check_exponent(node.right)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        _check(node.operand, names)
    elif isinstance(node, ast.Call):
        _check_call(node, names)
    else:
        raise GraderError(f"{ast.unparse(node)!r} is not allowed (numbers, grader names, "
                          f"+ - * / ** ^, parentheses and {', '.join(FUNCTIONS)} only)", PARAM)


def _check_call(node: ast.Call, names: set[str]) -> None:
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in FUNCTIONS or node.keywords:
        raise GraderError(f"{ast.unparse(node.func)!r} is not a function here "
                          f"({', '.join(FUNCTIONS)})", PARAM)
    _, fewest, most = FUNCTIONS[name]
    if len(node.args) < fewest or (most is not None and len(node.args) > most):
        raise GraderError(f"{name}() takes {fewest if most == fewest else f'{fewest} or more'}"
                          f" argument(s), not {len(node.args)}", PARAM)
    for arg in node.args:
        if isinstance(arg, ast.Starred):
            raise GraderError("* arguments are not allowed", PARAM)
        _check(arg, names)


def _check_exponent(node: ast.expr) -> None:
    """A constant exponent (no grader name in it) must be at most MAX_EXPONENT."""
    if any(isinstance(n, ast.Name) for n in ast.walk(node)):
        return
    try:
        value = evaluate(node, {})
    except (ArithmeticError, ValueError):
        value = math.inf
    if not abs(value) <= MAX_EXPONENT:
        raise GraderError(f"exponent {ast.unparse(node)} is too large (at most {MAX_EXPONENT})",
                          PARAM)


def evaluate(node: ast.expr, values: dict[str, float]) -> float:
    """The value of a checked tree; ArithmeticError or ValueError for division by zero, overflow, log(0)."""
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.BinOp):
        return _real(BINARY[type(node.op)](evaluate(node.left, values), evaluate(node.right, values)))
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](evaluate(node.operand, values))
    function = FUNCTIONS[node.func.id][0]
    return _real(function(*(evaluate(a, values) for a in node.args)))


def _real(value: float | complex) -> float:
    if isinstance(value, complex):  # a negative number to a fractional power
        raise ArithmeticError("the result is not a real number")
    return float(value)
