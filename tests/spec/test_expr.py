"""Tests of blockgraph.spec.expr: the ``${...}`` expression language."""

from __future__ import annotations

import ast
import inspect
import operator
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockgraph.spec import expr
from blockgraph.spec.expr import ExprError, evaluate, has_expressions, interpolate, names_used

SCOPE: dict[str, Any] = {
    "dims": [64, 128, 320, 512],
    "depths": [3, 4, 6, 3],
    "heads": 8,
    "i": 1,
    "windows": {3: 2, 5: 3, 7: 3},
    "name": "coat",
    "ratio": 4.0,
    "flag": True,
    "nothing": None,
    "pairs": [[1, "a"], [2, "b"]],
    "nested": {"stage": {"dim": 96}},
}


def same(value: Any, expected: Any) -> bool:
    """Equal, and of the same type all the way down (so 2 != 2.0 != True and a tuple is not a list)."""
    if type(value) is not type(expected):
        return False
    if isinstance(expected, list):
        return len(value) == len(expected) and all(same(v, e) for v, e in zip(value, expected, strict=True))
    if isinstance(expected, dict):
        return list(value) == list(expected) and all(same(value[k], expected[k]) for k in expected)
    return bool(value == expected)


# ------------------------------------------------------------------------------------------------------ valid input

VALID: list[tuple[str, Any]] = [
    # literals
    ("42", 42),
    ("-7", -7),
    ("2.5", 2.5),
    ("1e3", 1000.0),
    ("'text'", "text"),
    ('"a" "b"', "ab"),
    ("True", True),
    ("false", False),
    ("true", True),
    ("null", None),
    ("None", None),
    ("[1, 2.0, 'x', None]", [1, 2.0, "x", None]),
    ("(1, 2)", [1, 2]),
    ("()", []),
    ("{3: 2, 5: 3, 7: 3}", {3: 2, 5: 3, 7: 3}),
    ("{'a': [1, 2]}", {"a": [1, 2]}),
    ("  dims[0]  ", 64),
    # variables, indexing, slicing, dict keys
    ("dims", [64, 128, 320, 512]),
    ("dims[2]", 320),
    ("dims[-1]", 512),
    ("dims[i]", 128),
    ("dims[1:3]", [128, 320]),
    ("dims[::-1]", [512, 320, 128, 64]),
    ("dims[:i]", [64]),
    ("dims[10:]", []),
    ("name[0]", "c"),
    ("name[1:]", "oat"),
    ("windows[5]", 3),
    ("nested['stage']['dim']", 96),
    ("pairs[1][1]", "b"),
    # arithmetic
    ("dims[i] // heads", 16),
    ("dims[0] // 2", 32),
    ("7 / 2", 3.5),
    ("-7 // 2", -4),
    ("-7 % 3", 2),
    ("2 ** 10", 1024),
    ("2 ** -1", 0.5),
    ("(-2) ** 63", -(2**63)),
    ("3 ** 40", 3**40),
    ("2 ** 0.5 * 2 ** 0.5 > 1.99", True),
    ("ratio * dims[0]", 256.0),
    ("int(ratio * dims[0])", 256),
    ("1 + 2 * 3 - 4", 3),
    ("(1 + 2) * 3", 9),
    ("- - 3", 3),
    ("+heads", 8),
    ("-flag", -1),
    ("dims + [1024]", [64, 128, 320, 512, 1024]),
    ("[0] * 3", [0, 0, 0]),
    ("3 * 'ab'", "ababab"),
    ("'stage' + str(i)", "stage1"),
    ("[1] * -2", []),
    ("2 ** 63 + (2 ** 63 - 1)", 2**64 - 1),
    # logic and comparisons
    ("1 < 2 < 3", True),
    ("1 < 3 < 2", False),
    ("heads == 8 and not flag", False),
    ("heads or 5", 8),
    ("0 or nothing", None),
    ("nothing and 1", None),
    ("'oa' in name", True),
    ("5 in windows", True),
    ("4 not in windows", True),
    ("320 in dims", True),
    ("nothing is None", True),
    ("flag is not False", True),
    ("dims == [64, 128, 320, 512]", True),
    ("'a' < 'b'", True),
    ("'big' if heads > 4 else 'small'", "big"),
    ("1 if nothing else 2", 2),
    # functions
    ("min(dims)", 64),
    ("max(3, 9, 4)", 9),
    ("max([], default=0)", 0),
    ("abs(-3)", 3),
    ("int('12')", 12),
    ("int(7.9)", 7),
    ("float(3)", 3.0),
    ("round(2.567, 2)", 2.57),
    ("round(2.6)", 3),
    ("round(1234, -2)", 1200),
    ("round(5, -10**18)", 0),  # not computed through 10**(10**18)
    ("len(dims)", 4),
    ("len(windows)", 3),
    ("sum(depths)", 16),
    ("sum(depths, 100)", 116),
    ("sum([0.5, 1])", 1.5),
    ("range(4)", [0, 1, 2, 3]),
    ("range(10, 0, -3)", [10, 7, 4, 1]),
    ("sorted([3, 1, 2])", [1, 2, 3]),
    ("sorted(dims, reverse=True)", [512, 320, 128, 64]),
    ("sorted(windows)", [3, 5, 7]),
    ("str(2.5)", "2.5"),
    ("bool(0)", False),
    # comprehensions
    ("[d // 2 for d in dims]", [32, 64, 160, 256]),
    ("[sum(depths[:i]) for i in range(4)]", [0, 3, 7, 13]),
    ("[d for d in dims if d > 100 if d < 500]", [128, 320]),
    ("[[a, b] for a in range(3) for b in range(a)]", [[1, 0], [2, 0], [2, 1]]),
    ("[n for n, c in pairs]", [1, 2]),
    ("[[x for x in row] for row in [[1, 2], [3]]]", [[1, 2], [3]]),
    ("[c for c in name]", ["c", "o", "a", "t"]),
    ("[k for k in windows]", [3, 5, 7]),
    ("sum(d for d in depths)", 16),
    ("{w: h * 2 for w, h in [[3, 2], [5, 3]]}", {3: 4, 5: 6}),
    ("[i for i in range(3)] + [i]", [0, 1, 2, 1]),  # the comprehension's i does not leak
    ("[i for i in dims[:i + 1]]", [64, 128]),  # the first iterable sees the outer i
    ("[[i, j] for i in range(2) for j in range(i, 2)]", [[0, 0], [0, 1], [1, 1]]),
]


@pytest.mark.parametrize(("expression", "expected"), VALID)
def test_valid_expressions(expression: str, expected: Any) -> None:
    value = evaluate(expression, SCOPE)
    assert same(value, expected), f"{expression!r} gave {value!r} ({type(value).__name__})"


def test_scope_values_are_returned_as_they_are() -> None:
    scope = {"shape": (3, 4), "obj": object()}
    assert evaluate("shape", scope) == (3, 4)
    assert evaluate("obj", scope) is scope["obj"]
    assert evaluate("shape[1]", scope) == 4


# ------------------------------------------------------------------------------------------------------ interpolate

INTERPOLATE: list[tuple[str, Any]] = [
    ("plain text", "plain text"),
    ("${dims}", [64, 128, 320, 512]),
    ("${heads}", 8),
    ("${ratio}", 4.0),
    ("${flag}", True),
    ("${nothing}", None),
    ("${windows}", {3: 2, 5: 3, 7: 3}),
    ("${name}", "coat"),
    ("stage${i + 1}", "stage2"),
    ("${name}_${dims[0]}x${heads}", "coat_64x8"),
    (" ${heads}", " 8"),
    ("${heads} ", "8 "),
    ("use_bias_${flag}", "use_bias_True"),
    ("v=${nothing}", "v=None"),
    ("dims=${dims[:2]}", "dims=[64, 128]"),
    ("r=${ratio}", "r=4.0"),
    ("cost: $${price}", "cost: ${price}"),
    ("$${heads}", "${heads}"),
    ("$${a} ${heads}", "${a} 8"),
    ("${'}'}", "}"),
    ("${'{'}${'}'}", "{}"),
    ("${ {'a': 1}['a'] }", 1),
    ("${{'a': 1}['a']}", 1),
    ("${'''x}'''}", "x}"),
    ("$ {heads} and $heads", "$ {heads} and $heads"),
]


@pytest.mark.parametrize(("text", "expected"), INTERPOLATE)
def test_interpolate(text: str, expected: Any) -> None:
    value = interpolate(text, SCOPE)
    assert same(value, expected), f"{text!r} gave {value!r}"


def test_interpolate_fast_path_returns_the_same_string() -> None:
    text = "no expressions here, only $ and { and }"
    assert interpolate(text, SCOPE) is text


@pytest.mark.parametrize(
    ("text", "expected"),
    [("${x}", True), ("a ${x} b", True), ("$${x}", False), ("plain", False), ("${x", True), ("$$${x}", False)],
)
def test_has_expressions(text: str, expected: bool) -> None:
    assert has_expressions(text) is expected


# ------------------------------------------------------------------------------------------------------- names_used

NAMES: list[tuple[str, set[str]]] = [
    ("dims[i] // heads", {"dims", "i", "heads"}),
    ("[d // 2 for d in dims]", {"dims"}),
    ("[y for x in xs for y in x if y > t]", {"xs", "t"}),
    ("[x for x in x]", {"x"}),
    ("[[a for a in row] for row in m] + [a]", {"m", "a"}),
    ("{k: v for k, v in items}", {"items"}),
    ("true or null or k", {"k"}),
    ("max(a, b, default=c)", {"a", "b", "c"}),
    ("stage${i + 1}", {"i"}),
    ("${a} $${b} ${min(c, d)}", {"a", "c", "d"}),
]


@pytest.mark.parametrize(("source", "expected"), NAMES)
def test_names_used(source: str, expected: set[str]) -> None:
    assert names_used(source) == expected


def test_names_used_template_mode() -> None:
    assert names_used("relu", template=True) == set()
    assert names_used("relu") == {"relu"}
    assert names_used("${a}", template=True) == {"a"}
    with pytest.raises(ExprError) as info:
        names_used("x${a +}")
    assert info.value.offset == 6


# ---------------------------------------------------------------------------------------------------------- errors

# (text given to interpolate, message fragment, offset in the text, length or None)
ERRORS: list[tuple[str, str, int, int | None]] = [
    # names
    ("stage${j + 1}", "undefined variable 'j'", 7, 1),
    ("${dimz[0]}", "undefined variable 'dimz'", 2, 4),
    ("a${i}b${dimz}", "undefined variable 'dimz'", 8, 4),
    ("${'é×' + zz}", "undefined variable 'zz'", 9, 2),
    ("${[q for x in dims]}", "undefined variable 'q'", 3, 1),
    ("${[x for x in dims] + [x]}", "undefined variable 'x'", 23, 1),
    # indexing
    ("${dims[4]}", "index 4 out of range for a list of 4 items (valid: 0..3 or -4..-1)", 7, 1),
    ("${dims[-5]}", "index -5 out of range", 7, 2),
    ("${[][0]}", "out of range for an empty list", 5, 1),
    ("${name[9]}", "index 9 out of range for a str of 4 characters", 7, 1),
    ("${windows[4]}", "key 4 not found in dict", 10, 1),
    ("${nested['stag']}", "key 'stag' not found", 9, 6),
    ("${heads[0]}", "cannot index an int", 2, 5),
    ("${dims['a']}", "list indices must be integers, not str", 7, 3),
    ("${heads[1:]}", "cannot slice an int", 2, 5),
    ("${dims[::0]}", "slice step cannot be zero", 9, 1),
    ("${dims[1.5:]}", "slice bounds must be integers, not float", 7, 3),
    ("${windows[[1]]}", "a list cannot be a dict key", 10, 3),
    # types
    ("${'a' + 1}", "cannot add str and int", 2, 7),
    ("x = ${dims + 1}", "cannot add list and int", 6, 8),
    ("${dims - 1}", "cannot subtract list and int", 2, 8),
    ("${'a' * 2.0}", "cannot multiply str by float", 2, 9),
    ("${'%d' % 1}", "cannot take modulo of str and int", 2, 8),
    ("${'a' ** 2}", "cannot raise str to the power of int", 2, 8),
    ("${-name}", "cannot apply unary '-' to a str", 2, 5),
    ("${1 < 'a'}", "cannot compare int and str with '<'", 2, 7),
    ("${1 in name}", "cannot look for an int in a str", 2, 9),
    ("${1 in heads}", "cannot use 'in' on an int", 7, 5),
    ("${heads is 8}", "'is' compares identity", 2, 10),
    ("${[x for x in heads]}", "cannot iterate over an int", 14, 5),
    ("${[a for a, b in dims]}", "cannot unpack an int into 2 names", 9, 4),
    ("${[a for a, b, c in pairs]}", "cannot unpack a list of 2 items into 3 names", 9, 7),
    # arithmetic
    ("${1 / 0}", "division by zero", 2, 5),
    ("${heads // (i - 1)}", "division by zero", 2, 16),
    ("${5 % 0}", "modulo by zero", 2, 5),
    ("${0 ** -1}", "0 cannot be raised to a negative power", 2, 7),
    ("${2 ** 64}", "result too large", 2, 7),
    ("${2 ** 65}", "exponent 65 is too large", 7, 2),
    ("${18446744073709551616}", "result too large", 2, 20),
    ("${(-8) ** 0.5}", "complex number", 2, 11),
    ("${2.0 ** 5000}", "result too large", 2, 11),
    # functions
    ("${open('x')}", "function 'open' is not allowed in expressions", 2, 4),
    ("${lenn(dims)}", "function 'lenn' is not allowed", 2, 4),
    ("${max([])}", "max() arg is an empty sequence", 2, 7),
    ("${len(heads)}", "len(): object of type 'int' has no len()", 2, 10),
    ("${int('x')}", "int(): invalid literal", 2, 8),
    ("${sum(['a'])}", "sum() adds numbers, found a str", 2, 10),
    ("${sorted(dims, key=abs)}", "sorted() takes no keyword argument 'key'", 15, 7),
    ("${sorted([1, 'a'])}", "sorted():", 2, 16),
    ("${range(1.5)}", "range():", 2, 10),
    # forbidden syntax
    ("${dims.append}", "attribute access 'dims.append' is not allowed in expressions", 2, 11),
    ("${dims.copy()}", "calling 'dims.copy' is not allowed", 2, 9),
    ("${(lambda: 1)()}", "calling 'lambda: 1' is not allowed", 3, 9),
    ("${lambda: 1}", "lambda 'lambda: 1' is not allowed", 2, 9),
    ("${f'{heads}'}", "f-string", 2, 10),
    ("${(x := 1)}", "assignment 'x := 1' is not allowed", 3, 6),
    ("${[*dims]}", "unpacking '*dims' is not allowed", 3, 5),
    ("${{**windows}}", "unpacking '**windows' is not allowed", 5, 7),
    ("${max(*dims)}", "unpacking '*dims' is not allowed", 6, 5),
    ("${{1, 2}}", "set '{1, 2}' is not allowed", 2, 6),
    ("${{x for x in dims}}", "set comprehension", 2, 17),
    ("${1 | 2}", "operator '|' is not allowed in expressions", 4, 1),
    ("${heads << 1}", "operator '<<' is not allowed", 8, 2),
    ("${~1}", "operator '~' is not allowed", 2, 2),
    ("${1j}", "complex number '1j' is not allowed", 2, 2),
    ("${b'x'}", "bytes literal", 2, 4),
    ("${...}", "ellipsis literal", 2, 3),
    ("${[true for true in dims]}", "'true' is a literal and cannot be a variable", 12, 4),
    # syntax
    ("${dims[0}", "'[' was never closed", 6, 1),
    ("${1 +}", "invalid syntax", 5, 1),
    ("ab ${x = 1}", "invalid syntax", 7, 1),
    ("${1 if 2}", "expected 'else'", 2, 6),
    ("${'abc}", "unterminated '${'", 0, 2),
    ("text ${heads", "unterminated '${': no closing '}'", 5, 2),
    ("${heads} ${", "unterminated '${'", 9, 2),
    ("${}", "empty expression", 2, 1),
    ("x ${  }", "empty expression", 6, 1),
    ("${(heads}", "'(' was never closed", 2, 1),
    ("${heads)}", "unmatched ')'", 7, 1),
]


@pytest.mark.parametrize(("text", "fragment", "offset", "length"), ERRORS)
def test_errors(text: str, fragment: str, offset: int, length: int | None) -> None:
    with pytest.raises(ExprError) as info:
        interpolate(text, SCOPE)
    error = info.value
    assert fragment in error.message
    assert (error.offset, error.length) == (offset, length if length is not None else error.length), (
        f"{text!r}: error at {error.offset}+{error.length} ({text[error.offset : error.offset + error.length]!r})"
    )


@pytest.mark.parametrize(
    ("expression", "hint"),
    [
        ("dimz", "did you mean 'dims'?"),
        ("depht", "did you mean 'depths'?"),
        ("qqqq", "defined variables: depths, dims, flag, heads, i, name, nested, nothing, pairs, ratio, ... (1 more)"),
        ("lenn(dims)", "did you mean 'len'?"),
        ("zip(dims)", "allowed functions: abs, bool, float, int, len, max, min, pick, range, round, sorted, str, sum"),
        ("windows[4]", "keys: 3, 5, 7"),
        ("nested['stag']", "did you mean 'stage'?"),
        ("dims.copy()", "the functions abs, bool"),
        ("'a' + 1", "convert with str(...) or int(...)"),
        ("[x for x in dims if y]", "defined variables: depths, dims, flag, heads, i, name, nested, nothing, pairs"),
    ],
)
def test_error_hints(expression: str, hint: str) -> None:
    with pytest.raises(ExprError) as info:
        evaluate(expression, SCOPE)
    assert info.value.hint is not None and hint in info.value.hint


def test_undefined_in_empty_scope() -> None:
    with pytest.raises(ExprError, match="undefined variable 'x'") as info:
        evaluate("x", {})
    assert info.value.hint == "no variables are defined here"


def test_comprehension_variables_are_suggested() -> None:
    with pytest.raises(ExprError) as info:
        evaluate("[dimx for dim in dims]", SCOPE)
    assert info.value.hint == "did you mean 'dim' or 'dims'?"


def test_base_offset_and_multiline_positions() -> None:
    with pytest.raises(ExprError) as info:
        evaluate("dims[0] + nope", SCOPE, base_offset=30)
    assert (info.value.offset, info.value.length) == (40, 4)
    # the same expression again (parsing is cached): offsets follow the new base
    with pytest.raises(ExprError) as info:
        evaluate("dims[0] + nope", SCOPE, base_offset=3)
    assert info.value.offset == 13
    text = "[dims[0],\n  nope,\r\n 1]"
    with pytest.raises(ExprError) as info:
        evaluate(text, SCOPE)
    assert text[info.value.offset : info.value.offset + info.value.length] == "nope"
    text = "\n  'é' +\n  'ü' + nope"
    with pytest.raises(ExprError) as info:
        evaluate(f"({text})", SCOPE, base_offset=5)
    assert info.value.offset - 5 == f"({text})".index("nope")
    with pytest.raises(ExprError, match="too long") as info:
        evaluate("1" * 3000, SCOPE, base_offset=7)
    assert (info.value.offset, info.value.length) == (7, 3000)
    with pytest.raises(ExprError, match="invalid syntax") as info:
        evaluate("  1 2", SCOPE, base_offset=1)
    assert info.value.offset == 5


def test_error_str_has_the_hint() -> None:
    error = ExprError("undefined variable 'x'", 3, 1, "did you mean 'y'?")
    assert str(error) == "undefined variable 'x'\nhint: did you mean 'y'?"
    assert str(ExprError("boom")) == "boom"
    assert error.shifted(4).offset == 7


# ----------------------------------------------------------------------------------------------------------- scopes


class BrokenScopeError(Exception):
    """An error of the scope itself, e.g. a cycle between lazily evaluated variables."""


class LazyScope(Mapping[str, Any]):
    """Evaluates its variables on access, like the spec expander's scope."""

    def __init__(self) -> None:
        self.accessed: list[str] = []

    def __getitem__(self, name: str) -> Any:
        self.accessed.append(name)
        if name == "broken":
            raise BrokenScopeError("variables refer to each other in a cycle: broken -> broken")
        if name == "gone":
            raise KeyError(name)
        if name == "ok":
            return 5
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(["ok", "broken", "gone"])

    def __len__(self) -> int:
        return 3


@pytest.mark.parametrize("expression", ["broken", "ok + broken", "[broken for x in [1]]", "1 if broken else 2"])
def test_scope_exceptions_propagate(expression: str) -> None:
    with pytest.raises(BrokenScopeError, match="cycle"):
        evaluate(expression, LazyScope())


def test_scope_exceptions_propagate_through_interpolate() -> None:
    with pytest.raises(BrokenScopeError):
        interpolate("x${ok}y${broken}", LazyScope())


def test_scope_key_error_is_undefined_variable() -> None:
    scope = LazyScope()
    assert evaluate("ok * 2", scope) == 10
    with pytest.raises(ExprError, match="undefined variable 'gone'"):
        evaluate("gone", scope)
    with pytest.raises(ExprError, match="undefined variable 'okk'") as info:
        evaluate("okk", scope)
    assert info.value.hint == "did you mean 'ok'?"


def test_short_circuit_does_not_touch_the_scope() -> None:
    scope = LazyScope()
    assert evaluate("0 and broken", scope) == 0
    assert evaluate("ok or broken", scope) == 5
    assert evaluate("1 if ok else broken", scope) == 1
    assert "broken" not in scope.accessed


def test_missing_from_contains_is_undefined() -> None:
    class Defaulting(dict[str, Any]):
        def __missing__(self, key: str) -> int:
            return 0

    with pytest.raises(ExprError, match="undefined variable 'x'"):
        evaluate("x", Defaulting(y=1))


def test_aliases_are_literals_not_variables() -> None:
    assert evaluate("true", {"true": 5}) is True
    assert names_used("null") == set()


# ---------------------------------------------------------------------------------------------------------- hostile

HOSTILE: list[tuple[str, str]] = [
    ("9**9**9", "exponent 387,420,489 is too large"),
    ("'a'*10**9", "result too large"),
    ("[0]*10**9", "result too large"),
    ("10**9*[0]", "result too large"),
    ("[[0]*100000]*100000", "result too large"),
    ("range(10**12)", "range() would make 1,000,000,000,000 items"),
    ("range(-2**63, 2**63)", "range() would make"),
    ("(" * 500 + "1" + ")" * 500, "too many nested parentheses"),
    ("[" * 500 + "]" * 500, "too many nested parentheses"),
    ("-" * 1999 + "1", "nested too deeply"),
    ("1+" * 999 + "1", "nested too deeply"),
    ("x" * 10_000, "expression is too long"),
    ("1" * 2001, "expression is too long"),
    ("'%0999999999d' % 1", "cannot take modulo of str and int"),
    ("'a'*60000 + 'a'*60000", "result too large"),
    ("[0]*50000 + [0]*50001", "result too large"),
    ("str([10**18]*100000)", "result too large"),
    ("[[0]*1000 for i in range(1000)]", "result too large"),
    ("[x for x in range(1000) for y in range(1000)]", "more than 100,000 iterations"),
    ("sum([[0]]*40000, [])", "sum() adds numbers"),
    ("int(1e300)", "result too large"),
    ("int('1' * 5000)", "too long to be a number"),
    ("[0 " + " ".join(f"for a{k} in [1]" for k in range(60)) + "]", "nested too deeply"),
    ("2.0 ** 10**9", "result too large"),
    ("(2**63) * (2**63)", "result too large"),
]


@pytest.mark.parametrize(("expression", "fragment"), HOSTILE)
def test_hostile_input_fails_fast(expression: str, fragment: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ExprError) as info:
        evaluate(expression, {})
    elapsed = time.perf_counter() - start
    assert fragment in info.value.message
    assert elapsed < 0.5, f"{expression[:40]!r} took {elapsed:.3f}s"


def test_bounds_are_inclusive() -> None:
    assert len(evaluate("'a' * 100000", {})) == expr.MAX_ELEMENTS
    assert len(evaluate("[0] * 50000 + [1] * 50000", {})) == expr.MAX_ELEMENTS
    assert len(evaluate("range(100000)", {})) == expr.MAX_ELEMENTS
    assert evaluate("-(2 ** 63 - 1) * 2 - 1", {}) == -(2**64) + 1
    assert evaluate("2 ** 63 + (2 ** 63 - 1)", {}) == 2**64 - 1
    assert evaluate("[1][0] ** 64", {}) == 1
    assert evaluate("len('x' * 1999)", {}) == 1999


def test_step_budget_stops_expensive_expressions() -> None:
    start = time.perf_counter()
    with pytest.raises(ExprError, match="too expensive") as info:
        evaluate("[dims == dims for a in range(300) for b in range(300)]", {"dims": [[0]] * 50_000})
    assert time.perf_counter() - start < 2.0
    assert info.value.offset == 0


def test_huge_scope_values_are_not_spelled_out() -> None:
    big = list(range(200_000))
    assert evaluate("len(big)", {"big": big}) == 200_000
    assert interpolate("${big}", {"big": big}) is big
    with pytest.raises(ExprError, match="too large to insert into text"):
        interpolate("v=${big}", {"big": big})
    with pytest.raises(ExprError, match="more than 100,000 iterations"):
        evaluate("[x for x in big]", {"big": big})


def test_no_eval_exec_or_compile_in_the_module() -> None:
    tree = ast.parse(inspect.getsource(expr))
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__", "getattr", "globals"}


# ------------------------------------------------------------------------------------------------------- properties

_OPS = {"+": (operator.add, 1), "-": (operator.sub, 1), "*": (operator.mul, 2), "//": (operator.floordiv, 2)}
_OPS["%"] = (operator.mod, 2)


class Tree:
    """An integer arithmetic tree: its text (minimal parentheses), its value (None if a step passes 2**64)."""

    def __init__(self, text: str, value: int | None, precedence: int) -> None:
        self.text, self.value, self.precedence = text, value, precedence


def _leaf(n: int) -> Tree:
    return Tree(str(n), n, 3)  # '-3' binds tighter than any binary operator here


def _combine(left: Tree, op: str, right: Tree, spaced: bool) -> Tree:
    if op in ("//", "%") and right.value == 0:
        op = "-"  # keep divisors nonzero
    function, precedence = _OPS[op]
    left_text = f"({left.text})" if left.precedence < precedence else left.text
    right_text = f"({right.text})" if right.precedence <= precedence else right.text
    text = f"{left_text} {op} {right_text}" if spaced else f"{left_text}{op}{right_text}"
    value = None
    if left.value is not None and right.value is not None:
        value = function(left.value, right.value)
        if abs(value) >= 2**64:
            value = None
    return Tree(text, value, precedence)


_trees = st.recursive(
    st.integers(-40, 40).map(_leaf),
    lambda children: st.builds(_combine, children, st.sampled_from(sorted(_OPS)), children, st.booleans()),
    max_leaves=24,
)


@settings(max_examples=300, deadline=None)
@given(_trees)
def test_integer_arithmetic_matches_python(tree: Tree) -> None:
    if tree.value is None:
        with pytest.raises(ExprError, match="result too large"):
            evaluate(tree.text, {})
    else:
        value = evaluate(tree.text, {})
        assert type(value) is int and value == tree.value, tree.text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="${}'\"ab 1+", max_size=20))
def test_interpolate_never_raises_anything_but_expr_error(text: str) -> None:
    try:
        interpolate(text, {"a": 1, "b": "x"})
    except ExprError as e:
        assert 0 <= e.offset <= len(text)
        assert e.length >= 1
