"""The small, safe expression language of spec scalars: ``${dims[i] // heads}``.

An expression is a subset of Python's expression syntax, parsed with :mod:`ast` and evaluated by walking the tree
here; nothing is ever handed to ``eval``, ``exec`` or ``compile``. What is allowed:

- literals: numbers, strings, ``True``/``False``/``None`` (also written ``true``/``false``/``null``), lists,
  tuples (which evaluate to lists, like YAML sequences) and dicts (``{3: 2, 5: 3}``);
- variables from the scope, indexing (negative indices too), slicing and dict lookup: ``dims[-1]``,
  ``depths[:i]``, ``windows[3]``;
- ``+ - * / // % **``, unary ``-``/``+``, comparisons (chained too), ``in``/``not in``, ``is None``,
  ``and``/``or``/``not`` and ``a if c else b``;
- calls to a few functions only (:data:`FUNCTIONS`); ``range`` returns a list;
- list comprehensions (also generator expressions, which give lists, and dict comprehensions) with any number of
  ``for`` and ``if`` clauses: ``[sum(depths[:i]) for i in range(4)]``.

Everything else (attributes, other calls, lambdas, f-strings, ``:=``, ``*``-unpacking, bit operators, ...) is
an :class:`ExprError`. Hostile input is bounded: the text length, the nesting depth, the size of integers, of
strings and of lists, the number of comprehension iterations and the total work (see the ``MAX_*`` constants).

Every error carries the character offset of the problem in the source text, so the caller can report
``file:line:col``; see :func:`evaluate` and :func:`interpolate`.
"""

from __future__ import annotations

import ast
import difflib
import operator
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, NamedTuple, TypeVar

from blockgraph.errors import excerpt

__all__ = [
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "MAX_EXPRESSION_LENGTH",
    "MAX_INT",
    "MAX_ITERATIONS",
    "MAX_POWER",
    "MAX_STEPS",
    "ExprError",
    "evaluate",
    "has_expressions",
    "interpolate",
    "names_used",
]

MAX_EXPRESSION_LENGTH: Final = 2000
"""Longest expression text (the part inside ``${...}``), in characters."""
MAX_DEPTH: Final = 50
"""Deepest nesting of expression nodes (``a + b`` is two levels deep)."""
MAX_INT: Final = 2**64
"""Every integer result must satisfy ``abs(x) < MAX_INT``."""
MAX_POWER: Final = 64
"""Largest exponent of an integer ``**``."""
MAX_ELEMENTS: Final = 100_000
"""Largest string (characters) or list (elements, nested ones counted through) an operation may make."""
MAX_ITERATIONS: Final = 100_000
"""Most iterations of all comprehension ``for`` clauses of one expression together."""
MAX_STEPS: Final = 1_000_000
"""Most evaluation steps (nodes visited plus elements touched) of one expression."""

_T = TypeVar("_T")
_Node = ast.expr | ast.keyword
"""A node with a position."""

_SCALARS: Final = frozenset({int, float, bool, type(None)})
_ALIASES: Final[dict[str, Any]] = {"true": True, "false": False, "null": None}
_START = re.compile(r"\$\$\{|\$\{")
_NEWLINE = re.compile(r"\r\n|\r|\n")


class ExprError(Exception):
    """An error inside one expression.

    Attributes:
        message: what is wrong.
        offset: 0-based character offset of the problem in the source string (the whole scalar, including the text
            around ``${...}``; for :func:`evaluate`, ``base_offset`` plus the offset inside the expression).
        length: how many characters the problem spans (at least 1).
        hint: how to fix it, if there is something to say.
    """

    def __init__(self, message: str, offset: int = 0, length: int = 1, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.length = max(1, length)
        self.hint = hint

    def shifted(self, columns: int) -> ExprError:
        """The same error ``columns`` characters further right."""
        return ExprError(self.message, self.offset + columns, self.length, self.hint)

    def __str__(self) -> str:
        return f"{self.message}\nhint: {self.hint}" if self.hint else self.message


# --------------------------------------------------------------------------------------------------------------
# Public functions


def evaluate(expression: str, scope: Mapping[str, Any], *, base_offset: int = 0) -> Any:
    """Evaluate one expression (the text inside ``${...}``) against ``scope``.

    Args:
        expression: the expression text; leading and trailing whitespace is allowed.
        scope: the variables. Any mapping: a name is missing when ``name in scope`` is false or ``scope[name]``
            raises :class:`KeyError`; any other exception of the mapping propagates untouched.
        base_offset: added to every error offset (where the expression starts in its source string).

    Returns:
        The value: ``int``, ``float``, ``bool``, ``str``, ``None``, a list or a dict (or a value of the scope as is).

    Raises:
        ExprError: the expression is invalid, refers to an undefined variable, or fails (type error, index out of
            range, division by zero, a result too large, ...).
    """
    try:
        parsed = _parse(expression)
    except ExprError as e:
        raise e.shifted(base_offset) from None
    return _Evaluator(parsed, scope, base_offset).visit(parsed.tree)


def interpolate(text: str, scope: Mapping[str, Any]) -> Any:
    """Resolve every ``${...}`` of a scalar.

    - A text with no ``${`` is returned unchanged.
    - A text that is exactly one ``${...}`` (nothing around it, not even spaces) gives the expression's value with
      its own type: ``"${dims}"`` is a list, ``"${dims[0] // 2}"`` an int.
    - Otherwise the result is a string: each ``${...}`` is replaced by ``str(value)``, Python's spelling:
      ``stage${i + 1}`` gives ``stage2``, a bool gives ``True``/``False``, ``None`` gives ``None``, a list
      ``[64, 128]``.

    ``$${`` stands for a literal ``${`` and is never evaluated. Error offsets are offsets in ``text``.

    Raises:
        ExprError: as :func:`evaluate`, or a ``${`` has no closing ``}``.
    """
    if "${" not in text:
        return text
    pieces = _split(text)
    if len(pieces) == 1 and isinstance(pieces[0], _Embedded):
        return evaluate(pieces[0].source, scope, base_offset=pieces[0].start)
    return "".join(
        piece if isinstance(piece, str) else _to_text(evaluate(piece.source, scope, base_offset=piece.start), piece)
        for piece in pieces
    )


def has_expressions(text: str) -> bool:
    """Whether ``text`` holds a ``${`` to evaluate (a ``$${`` escape does not count; an unclosed ``${`` does)."""
    if "${" not in text:
        return False
    return any(m.group() == "${" for m in _START.finditer(text))


def names_used(expression_or_text: str, *, template: bool | None = None) -> set[str]:
    """The free variable names an expression, or every ``${...}`` of a text, refers to.

    Comprehension variables, the literal aliases ``true``/``false``/``null`` and the names of called functions are
    not free names.

    Args:
        expression_or_text: an expression (as given to :func:`evaluate`) or a text (as given to
            :func:`interpolate`).
        template: ``True`` reads the string as a text, so a string without ``${`` has no names; ``False`` reads it
            as one expression; ``None`` (default) reads it as a text when it contains ``${``, else as an
            expression. To find what a YAML scalar depends on, pass ``template=True``.

    Raises:
        ExprError: an expression does not parse (offsets as in :func:`evaluate` / :func:`interpolate`).
    """
    if template is None:
        template = "${" in expression_or_text
    return set(_names_used(expression_or_text, template))


@lru_cache(maxsize=4096)
def _names_used(expression_or_text: str, template: bool) -> frozenset[str]:
    """:func:`names_used`, memoized (a repeated block asks the same of every repetition)."""
    if not template:
        return frozenset(_free_names(_parse(expression_or_text).tree))
    names: set[str] = set()
    for piece in _split(expression_or_text):
        if isinstance(piece, _Embedded):
            try:
                parsed = _parse(piece.source)
            except ExprError as e:
                raise e.shifted(piece.start) from None
            names |= _free_names(parsed.tree)
    return frozenset(names)


# --------------------------------------------------------------------------------------------------------------
# Templates: "stage${i + 1}" -> ["stage", _Embedded(7, "i + 1")]


class _Embedded(NamedTuple):
    start: int
    """Offset of the expression text (just after ``${``) in the template."""
    source: str


@lru_cache(maxsize=4096)
def _split(text: str) -> tuple[str | _Embedded, ...]:
    """Cut a template into literal strings (escapes resolved, never empty) and embedded expressions (memoized)."""
    pieces: list[str | _Embedded] = []
    literal = ""
    pos = 0
    while (m := _START.search(text, pos)) is not None:
        literal += text[pos : m.start()]
        pos = m.end()
        if m.group() == "$${":
            literal += "${"
            continue
        close = _find_close(text, pos)
        if close < 0:
            raise ExprError(
                "unterminated '${': no closing '}'",
                m.start(),
                2,
                hint="close the expression with '}', or write '$${' for a literal '${'",
            )
        if literal:
            pieces.append(literal)
        literal = ""
        pieces.append(_Embedded(pos, text[pos:close]))
        pos = close + 1
    literal += text[pos:]
    if literal:
        pieces.append(literal)
    return tuple(pieces)


def _find_close(text: str, start: int) -> int:
    """Index of the ``}`` that ends the expression starting at ``start``, or -1.

    Skips string literals and balanced brackets, so ``${ {3: 2}[3] }`` and ``${'}'}`` work. A ``}`` while only
    ``(`` or ``[`` are open still ends the expression (the parser then reports the unclosed bracket).
    """
    open_brackets: list[str] = []
    pairs = {")": "(", "]": "["}
    i = start
    while i < len(text):
        c = text[i]
        if c in "'\"":
            quote = c * 3 if text.startswith(c * 3, i) else c
            i += len(quote)
            while i < len(text) and not text.startswith(quote, i):
                i += 2 if text[i] == "\\" else 1
            if i >= len(text):
                return -1
            i += len(quote)
            continue
        if c in "([{":
            open_brackets.append(c)
        elif c in ")]":
            if open_brackets and open_brackets[-1] == pairs[c]:
                open_brackets.pop()
        elif c == "}":
            if "{" not in open_brackets:
                return i
            while open_brackets.pop() != "{":
                pass
        i += 1
    return -1


def _to_text(value: Any, piece: _Embedded) -> str:
    """``str(value)`` for a value embedded in text, refusing values too large to spell out."""
    if isinstance(value, str):
        return value
    if _weight(value, MAX_ELEMENTS)[0] > MAX_ELEMENTS:
        raise ExprError(
            f"the value of '${{{piece.source.strip()}}}' is too large to insert into text",
            piece.start,
            len(piece.source),
        )
    try:
        return str(value)
    except RecursionError:
        raise ExprError("value is nested too deeply to insert into text", piece.start, len(piece.source)) from None


# --------------------------------------------------------------------------------------------------------------
# Parsing and positions


@dataclass(frozen=True)
class _Parsed:
    """A parsed expression and what is needed to turn ``ast`` positions into character offsets."""

    tree: ast.expr
    text: str
    """The parsed text: the expression without its leading whitespace."""
    lead: int
    """Characters of leading whitespace removed."""
    line_starts: tuple[int, ...]

    def offset(self, lineno: int, col: int) -> int:
        """Character offset in the expression of ``ast``'s ``(lineno, col_offset)``; the column counts UTF-8 bytes."""
        start = self.line_starts[lineno - 1]
        if not self.text.isascii():
            end = self.line_starts[lineno] if lineno < len(self.line_starts) else len(self.text)
            col = len(self.text[start:end].encode()[:col].decode("utf-8", "replace"))
        return self.lead + start + col

    def span(self, node: _Node, last: _Node | None = None) -> tuple[int, int]:
        """``(offset, length)`` of ``node`` (through ``last``, when given) in the expression."""
        end = last or node
        start = self.offset(node.lineno, node.col_offset)
        if end.end_lineno is None or end.end_col_offset is None:  # never for a parsed tree
            return start, 1
        return start, self.offset(end.end_lineno, end.end_col_offset) - start

    def segment(self, node: _Node, limit: int = 40) -> str:
        """The source text of ``node``, shortened to ``limit`` characters."""
        start, length = self.span(node)
        text = self.text[start - self.lead : start - self.lead + length]
        return text if len(text) <= limit else text[: limit - 3] + "..."


@lru_cache(maxsize=2048)
def _parse(expression: str) -> _Parsed:
    """Parse and check the shape of an expression; errors have offsets relative to ``expression``."""
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise ExprError(
            f"expression is too long ({len(expression):,} characters; the limit is {MAX_EXPRESSION_LENGTH:,})",
            0,
            len(expression),
            hint="split it into several variables",
        )
    text = expression.lstrip(" \t\r\n")
    lead = len(expression) - len(text)
    if not text.strip():
        raise ExprError("empty expression", lead, 1, hint="write an expression inside '${...}', e.g. '${dims[0]}'")
    starts = (0, *(m.end() for m in _NEWLINE.finditer(text)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escape sequences in string literals
            tree = ast.parse(text + "\n", mode="eval")
    except SyntaxError as e:
        raise _syntax_error(e, text, lead, starts) from None
    except (ValueError, MemoryError, RecursionError) as e:
        raise ExprError(f"invalid expression: {e}", 0, len(expression)) from None
    parsed = _Parsed(tree.body, text, lead, starts)
    _check_depth(parsed)
    return parsed


def _syntax_error(e: SyntaxError, text: str, lead: int, starts: tuple[int, ...]) -> ExprError:
    """An :class:`ExprError` at the place ``ast.parse`` complained about (its columns count characters)."""
    message = f"invalid expression: {e.msg}"
    if not e.lineno or e.lineno > len(starts):
        return ExprError(message, lead + len(text.rstrip()), 1)
    offset = min(starts[e.lineno - 1] + max((e.offset or 1) - 1, 0), len(text))
    length = 1
    if e.end_lineno == e.lineno and e.end_offset and e.offset and e.end_offset > e.offset:
        length = e.end_offset - e.offset
    return ExprError(message, lead + offset, length)


def _check_depth(parsed: _Parsed) -> None:
    """Refuse trees nested deeper than :data:`MAX_DEPTH` expression nodes (the evaluator recurses on them).

    The k-th ``for`` clause of a comprehension counts as k levels deeper: the evaluator nests one loop in another.
    """
    stack: list[tuple[ast.AST, int]] = [(parsed.tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH and isinstance(node, ast.expr):
            raise ExprError(
                f"expression is nested too deeply (more than {MAX_DEPTH} levels)",
                *parsed.span(node),
                hint="split it into several variables",
            )
        clauses = node.generators if isinstance(node, ast.ListComp | ast.GeneratorExp | ast.DictComp) else []
        stack.extend((clause, depth + k) for k, clause in enumerate(clauses))
        stack.extend(
            (child, depth + isinstance(child, ast.expr))
            for child in ast.iter_child_nodes(node)
            if not isinstance(child, ast.comprehension)
        )


def _free_names(node: ast.AST, bound: frozenset[str] = frozenset()) -> set[str]:
    """Names ``node`` reads from the scope (``bound`` holds the comprehension variables around it)."""
    if isinstance(node, ast.Name):
        return set() if node.id in bound or node.id in _ALIASES else {node.id}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        children: list[ast.AST] = [*node.args, *node.keywords]
        return set().union(*(_free_names(child, bound) for child in children))
    if isinstance(node, ast.ListComp | ast.GeneratorExp | ast.SetComp | ast.DictComp):
        names = _free_names(node.generators[0].iter, bound)
        inner = set(bound)
        for i, gen in enumerate(node.generators):
            if i:
                names |= _free_names(gen.iter, frozenset(inner))
            inner |= {n.id for n in ast.walk(gen.target) if isinstance(n, ast.Name)}
            for cond in gen.ifs:
                names |= _free_names(cond, frozenset(inner))
        results = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        return names.union(*(_free_names(r, frozenset(inner)) for r in results))
    return set().union(*(_free_names(child, bound) for child in ast.iter_child_nodes(node)))


# --------------------------------------------------------------------------------------------------------------
# Values


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _a(value: Any) -> str:
    """The type of ``value`` with its article: ``an int``, ``a list``, ``None``."""
    name = _type_name(value)
    return name if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)


def _weight(value: Any, limit: int) -> tuple[int, int]:
    """``(weight, visits)``: elements of ``value``, counted through nested lists and dicts, strings counting their
    characters; counting stops once it passes ``limit`` (then ``weight > limit``). ``visits`` is the work done."""
    total = visits = 0
    stack = [value]
    while stack:
        item = stack.pop()
        visits += 1
        if isinstance(item, list | tuple) and item:
            if total + len(stack) + len(item) > limit or visits > 2 * limit:
                return limit + 1, visits
            if _SCALARS.issuperset(map(type, item)):  # a flat list of numbers, counted at C speed
                total += len(item)
                continue
            stack.extend(item)
        elif isinstance(item, dict) and item:
            if total + len(stack) + 2 * len(item) > limit or visits > 2 * limit:
                return limit + 1, visits
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            total += max(1, len(item)) if isinstance(item, str) else 1
            if total > limit:
                return total, visits
    return total, visits


def _describe_length(value: Any) -> str:
    """``a list of 4 items``, ``a str of 1 character``, ``an empty list``."""
    kind, n = _type_name(value), len(value)
    unit = "character" if isinstance(value, str) else "item"
    if n == 0:
        return f"an empty {kind}"
    return f"a {kind} of {n} {unit}{'s' if n != 1 else ''}"


def _did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if not close:
        return None
    quoted = [f"'{c}'" for c in close]
    return f"did you mean {' or '.join(quoted) if len(quoted) < 3 else ', '.join(quoted[:-1]) + ' or ' + quoted[-1]}?"


def _list_some(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------------------------
# Functions callable from expressions


@dataclass(frozen=True)
class _Function:
    impl: Callable[..., Any]
    """Called with the evaluated positional and keyword arguments."""
    keywords: frozenset[str] = frozenset()
    """Keyword arguments accepted."""
    heavy: bool = False
    """Whether its cost grows with the size of its arguments (charged to the step budget)."""


class _CallError(Exception):
    """Raised by a function implementation; becomes an :class:`ExprError` at the call."""


def _range(*args: Any) -> list[int]:
    r = range(*args)
    try:
        n = len(r)
    except OverflowError:
        n = MAX_ELEMENTS + 1
    if n > MAX_ELEMENTS:
        raise _CallError(f"range() would make {n:,} items; the limit is {MAX_ELEMENTS:,}")
    return list(r)


def _sum(*args: Any, **kwargs: Any) -> Any:
    if len(args) + len(kwargs) not in (1, 2) or not args:
        raise TypeError("sum() takes a list and an optional start value")
    iterable, start = args[0], (*args[1:], *kwargs.values(), 0)[0]
    items = list(iterable)
    for item in (*items, start):
        if not _is_number(item):
            raise _CallError(f"sum() adds numbers, found {_a(item)}")
    return sum(items, start)


def _int(*args: Any) -> int:
    if args and isinstance(args[0], str) and len(args[0]) > 100:  # parsing digits is quadratic; no int needs 100
        raise _CallError(f"int(): a string of {len(args[0]):,} characters is too long to be a number")
    return int(*args)


def _pick(value: Any, index: Any) -> Any:
    """``value[index]`` for a list (one value per stage, say), ``value`` itself otherwise (the same for all)."""
    if not isinstance(value, list):
        return value
    if not isinstance(index, int) or isinstance(index, bool):
        raise _CallError(f"pick(): the index must be a whole number, got {excerpt(index)}")
    if not -len(value) <= index < len(value):
        raise _CallError(f"pick(): index {index} is out of range for a list of {len(value)} values ({excerpt(value)})")
    return value[index]


def _round(*args: Any) -> Any:
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], int) and args[1] < -400:
        args = (args[0], -400)  # the same result (0), without computing 10**-ndigits
    return round(*args)


def _str(*args: Any) -> str:
    if args and _weight(args[0], MAX_ELEMENTS)[0] > MAX_ELEMENTS:
        raise _CallError(f"str(): the value is too large to convert (more than {MAX_ELEMENTS:,} elements)")
    return str(*args)


_FUNCTIONS: Final[dict[str, _Function]] = {
    "abs": _Function(abs),
    "bool": _Function(bool),
    "float": _Function(float),
    "int": _Function(_int),
    "len": _Function(len),
    "max": _Function(max, frozenset({"default"}), heavy=True),
    "min": _Function(min, frozenset({"default"}), heavy=True),
    "pick": _Function(_pick),
    "range": _Function(_range),
    "round": _Function(_round),
    "sorted": _Function(sorted, frozenset({"reverse"}), heavy=True),
    "str": _Function(_str, heavy=True),
    "sum": _Function(_sum, frozenset({"start"}), heavy=True),
}
FUNCTIONS: Final[tuple[str, ...]] = tuple(sorted(_FUNCTIONS))
"""The names of the functions an expression may call."""

_ALLOWED = (
    "expressions may use variables, literals, [i] indexing and [a:b] slicing, + - * / // % **, comparisons, "
    "in, and/or/not, 'a if c else b', list comprehensions and the functions " + ", ".join(FUNCTIONS)
)

_BINARY_SYMBOLS: Final[dict[type[ast.AST], str]] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.BitOr: "|",
    ast.BitAnd: "&",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.MatMult: "@",
}

_FORBIDDEN: Final[dict[type[ast.AST], str]] = {
    ast.Attribute: "attribute access",
    ast.Lambda: "lambda",
    ast.Starred: "unpacking",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string",
    ast.NamedExpr: "assignment",
    ast.Set: "set",
    ast.SetComp: "set comprehension",
    ast.Slice: "slice outside of '[...]'",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}

_ORDERINGS: Final[dict[type[ast.AST], Callable[[Any, Any], Any]]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_COMPARE_SYMBOLS: Final[dict[type[ast.AST], str]] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}


# --------------------------------------------------------------------------------------------------------------
# The evaluator


class _Evaluator:
    """Walks one parsed expression. Each node type has one method; :data:`_HANDLERS` maps types to methods."""

    def __init__(self, parsed: _Parsed, scope: Mapping[str, Any], base: int) -> None:
        self.parsed = parsed
        self.scope = scope
        self.base = base
        self.frames: list[dict[str, Any]] = []
        """Comprehension variables, innermost last."""
        self.steps = 0
        self.iterations = 0

    # -- errors, budgets -----------------------------------------------------------------------------------------

    def error(self, message: str, node: _Node, hint: str | None = None, last: _Node | None = None) -> ExprError:
        offset, length = self.parsed.span(node, last)
        return ExprError(message, self.base + offset, length, hint)

    def spend(self, steps: int) -> None:
        self.steps += steps
        if self.steps > MAX_STEPS:
            raise ExprError(
                f"expression is too expensive to evaluate (more than {MAX_STEPS:,} steps)",
                self.base + self.parsed.lead,
                len(self.parsed.text.rstrip()),
                hint="use smaller ranges or lists",
            )

    def weigh(self, value: Any, limit: int = MAX_ELEMENTS) -> int:
        """:func:`_weight` of ``value``, charging the work to the step budget."""
        weight, visits = _weight(value, limit)
        self.spend(visits)
        return weight

    def check_size(self, value: _T, node: _Node) -> _T:
        """``value``, unless it holds more than :data:`MAX_ELEMENTS` elements."""
        if isinstance(value, list | tuple | dict | str) and self.weigh(value) > MAX_ELEMENTS:
            raise self.error(f"result too large (more than {MAX_ELEMENTS:,} elements)", node)
        return value

    def check_number(self, value: Any, node: _Node) -> Any:
        """``value``, unless it is an integer out of bounds or a complex number."""
        if isinstance(value, int) and not -MAX_INT < value < MAX_INT:
            raise self.error("result too large (integers must stay below 2**64 in magnitude)", node)
        if isinstance(value, complex):
            raise self.error("result is a complex number", node, hint="a negative number has no real fractional power")
        return value

    # -- dispatch --------------------------------------------------------------------------------------------------

    def visit(self, node: ast.expr) -> Any:
        self.spend(1)
        handler = _HANDLERS.get(type(node))
        if handler is None:
            raise self.not_allowed(node)
        return handler(self, node)

    def not_allowed(self, node: _Node, what: str | None = None) -> ExprError:
        what = what or _FORBIDDEN.get(type(node), type(node).__name__)
        return self.error(f"{what} '{self.parsed.segment(node)}' is not allowed in expressions", node, _ALLOWED)

    # -- leaves ----------------------------------------------------------------------------------------------------

    def constant(self, node: ast.Constant) -> Any:
        value = node.value
        if isinstance(value, int) or value is None or isinstance(value, float | str):
            return self.check_number(value, node)
        what = "complex number" if isinstance(value, complex) else f"{type(value).__name__} literal"
        raise self.not_allowed(node, what)

    def name(self, node: ast.Name) -> Any:
        name = node.id
        if name in _ALIASES:
            return _ALIASES[name]
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        try:
            if name in self.scope:
                return self.scope[name]
        except KeyError:
            pass
        known = sorted({k for k in self.scope if isinstance(k, str)} | {k for f in self.frames for k in f})
        hint = _did_you_mean(name, known)
        if hint is None:
            hint = f"defined variables: {_list_some(known)}" if known else "no variables are defined here"
        raise self.error(f"undefined variable '{name}'", node, hint)

    # -- displays --------------------------------------------------------------------------------------------------

    def sequence(self, node: ast.List | ast.Tuple) -> list[Any]:
        return self.check_size([self.visit(e) for e in node.elts], node)

    def dict_display(self, node: ast.Dict) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        for key_node, value_node in zip(node.keys, node.values, strict=True):
            if key_node is None:
                segment = self.parsed.segment(value_node)
                raise self.error(f"unpacking '**{segment}' is not allowed in expressions", value_node, _ALLOWED)
            key = self.visit(key_node)
            self.set_item(result, key, self.visit(value_node), key_node)
        return self.check_size(result, node)

    def set_item(self, target: dict[Any, Any], key: Any, value: Any, key_node: ast.expr) -> None:
        try:
            target[key] = value
        except TypeError:
            raise self.error(f"{_a(key)} cannot be a dict key", key_node) from None

    # -- operators -------------------------------------------------------------------------------------------------

    def unary(self, node: ast.UnaryOp) -> Any:
        operand = self.visit(node.operand)
        if isinstance(node.op, ast.Not):
            return not operand
        if isinstance(node.op, ast.Invert):
            raise self.error("operator '~' is not allowed in expressions", node, _ALLOWED)
        if not _is_number(operand):
            sign = "-" if isinstance(node.op, ast.USub) else "+"
            raise self.error(f"cannot apply unary '{sign}' to {_a(operand)}", node)
        return self.check_number(-operand if isinstance(node.op, ast.USub) else +operand, node)

    def binary(self, node: ast.BinOp) -> Any:
        op = type(node.op)
        symbol = _BINARY_SYMBOLS.get(op, "?")
        if op not in _ARITHMETIC:
            left_start, left_length = self.parsed.span(node.left)
            right_start = self.parsed.span(node.right)[0]
            lead = self.parsed.lead
            where = self.parsed.text[left_start + left_length - lead : right_start - lead].find(symbol)
            if where < 0:
                raise self.not_allowed(node, f"operator '{symbol}'")
            start = self.base + left_start + left_length + where
            raise ExprError(f"operator '{symbol}' is not allowed in expressions", start, len(symbol), _ALLOWED)
        left = self.visit(node.left)
        right = self.visit(node.right)
        return self.check_number(_ARITHMETIC[op](self, node, left, right), node)

    def add(self, node: ast.BinOp, a: Any, b: Any) -> Any:
        if _is_number(a) and _is_number(b):
            return a + b
        if type(a) is type(b) and isinstance(a, str | list | tuple):
            if self.weigh(a) + self.weigh(b) > MAX_ELEMENTS:
                raise self.error(f"result too large (more than {MAX_ELEMENTS:,} elements)", node)
            return a + b
        hint = "convert with str(...) or int(...) first" if isinstance(a, str) or isinstance(b, str) else None
        raise self.error(f"cannot add {_type_name(a)} and {_type_name(b)}", node, hint)

    def multiply(self, node: ast.BinOp, a: Any, b: Any) -> Any:
        if _is_number(a) and _is_number(b):
            return a * b
        seq, count = (a, b) if isinstance(b, int) else (b, a)
        if isinstance(seq, str | list | tuple) and isinstance(count, int):
            if count <= 0 or not seq:
                return seq[:0]
            if self.weigh(seq, MAX_ELEMENTS // count) * count > MAX_ELEMENTS:
                raise self.error(
                    f"result too large: repeating {_describe_length(seq)} {count:,} times gives more than "
                    f"{MAX_ELEMENTS:,} {'characters' if isinstance(seq, str) else 'elements (nested ones counted)'}",
                    node,
                )
            return seq * count
        raise self.error(f"cannot multiply {_type_name(a)} by {_type_name(b)}", node)

    def numeric(self, node: ast.BinOp, a: Any, b: Any) -> Any:
        """``- / // %``: numbers only (``%`` never formats strings)."""
        op = type(node.op)
        if not (_is_number(a) and _is_number(b)):
            verb = {ast.Sub: "subtract", ast.Div: "divide", ast.FloorDiv: "floor-divide", ast.Mod: "take modulo of"}
            raise self.error(f"cannot {verb[op]} {_type_name(a)} and {_type_name(b)}", node)
        try:
            if op is ast.Sub:
                return a - b
            if op is ast.Div:
                return a / b
            return a // b if op is ast.FloorDiv else a % b
        except ZeroDivisionError:
            raise self.error("division by zero" if op is not ast.Mod else "modulo by zero", node) from None
        except OverflowError:
            raise self.error("result too large", node) from None

    def power(self, node: ast.BinOp, a: Any, b: Any) -> Any:
        if not (_is_number(a) and _is_number(b)):
            raise self.error(f"cannot raise {_type_name(a)} to the power of {_type_name(b)}", node)
        if isinstance(a, int) and isinstance(b, int):
            if b > MAX_POWER:
                raise self.error(f"exponent {b:,} is too large (at most {MAX_POWER})", node.right)
            if b > 0 and (abs(a).bit_length() - 1) * b >= 64:
                raise self.error("result too large (integers must stay below 2**64 in magnitude)", node)
        try:
            return a**b
        except ZeroDivisionError:
            raise self.error("0 cannot be raised to a negative power", node) from None
        except OverflowError:
            raise self.error("result too large", node) from None

    def boolean(self, node: ast.BoolOp) -> Any:
        value: Any = None
        for operand in node.values:
            value = self.visit(operand)
            if isinstance(node.op, ast.And) != bool(value):
                return value
        return value

    def if_else(self, node: ast.IfExp) -> Any:
        return self.visit(node.body if self.visit(node.test) else node.orelse)

    def compare(self, node: ast.Compare) -> bool:
        left_node: ast.expr = node.left
        left = self.visit(left_node)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self.visit(right_node)
            if not self.compare_one(op, left, right, left_node, right_node):
                return False
            left, left_node = right, right_node
        return True

    def compare_one(self, op: ast.cmpop, a: Any, b: Any, a_node: ast.expr, b_node: ast.expr) -> bool:
        symbol = _COMPARE_SYMBOLS[type(op)]
        try:
            if isinstance(op, ast.Eq | ast.NotEq):
                for side in (a, b):
                    if isinstance(side, list | tuple | dict):
                        self.weigh(side)
                return bool(a == b) == isinstance(op, ast.Eq)
            if isinstance(op, ast.Is | ast.IsNot):
                if not any(v is None or isinstance(v, bool) for v in (a, b)):
                    raise self.error(
                        f"'{symbol}' compares identity", a_node, hint="use '==' or '!=' to compare values", last=b_node
                    )
                return (a is b) == isinstance(op, ast.Is)
            if isinstance(op, ast.In | ast.NotIn):
                return self.contains(b, a, a_node, b_node) == isinstance(op, ast.In)
            return bool(_ORDERINGS[type(op)](a, b))
        except (TypeError, ValueError):
            raise self.error(
                f"cannot compare {_type_name(a)} and {_type_name(b)} with '{symbol}'", a_node, last=b_node
            ) from None
        except RecursionError:
            raise self.error("values are nested too deeply to compare", a_node, last=b_node) from None

    def contains(self, container: Any, item: Any, item_node: ast.expr, container_node: ast.expr) -> bool:
        if isinstance(container, str):
            if not isinstance(item, str):
                raise self.error(f"cannot look for {_a(item)} in a str", item_node, last=container_node)
            return item in container
        if isinstance(container, list | tuple):
            self.weigh(container)
            return item in container
        if isinstance(container, Mapping):
            try:
                return item in container
            except TypeError:
                raise self.error(f"{_a(item)} cannot be a dict key", item_node) from None
        raise self.error(f"cannot use 'in' on {_a(container)}", container_node)

    # -- subscripts ------------------------------------------------------------------------------------------------

    def subscript(self, node: ast.Subscript) -> Any:
        value = self.visit(node.value)
        if isinstance(node.slice, ast.Slice):
            return self.slice(value, node.slice, node)
        key = self.visit(node.slice)
        if isinstance(value, list | tuple | str):
            if not isinstance(key, int):
                raise self.error(
                    f"{_type_name(value)} indices must be integers, not {_type_name(key)}",
                    node.slice,
                    hint="dicts are indexed by key; lists and strings by position",
                )
            n = len(value)
            if not -n <= key < n:
                valid = f" (valid: {'0 or -1' if n == 1 else f'0..{n - 1} or -{n}..-1'})" if n else ""
                raise self.error(f"index {key} out of range for {_describe_length(value)}{valid}", node.slice)
            return value[key]
        if isinstance(value, Mapping):
            try:
                if key in value:
                    return value[key]
            except TypeError:
                raise self.error(f"{_a(key)} cannot be a dict key", node.slice) from None
            except KeyError:
                pass
            keys = [repr(k) for k in value]
            hint = _did_you_mean(key, [k for k in value if isinstance(k, str)]) if isinstance(key, str) else None
            hint = hint or (f"keys: {_list_some(keys)}" if keys else "the dict is empty")
            raise self.error(f"key {excerpt(key)} not found in dict", node.slice, hint)
        raise self.error(
            f"cannot index {_a(value)}",
            node.value,
            hint="only lists, strings and dicts can be indexed",
        )

    def slice(self, value: Any, node: ast.Slice, whole: ast.Subscript) -> Any:
        if not isinstance(value, list | tuple | str):
            raise self.error(f"cannot slice {_a(value)}", whole.value, hint="only lists and strings slice")
        bounds: list[int | None] = []
        for part in (node.lower, node.upper, node.step):
            bound = None if part is None else self.visit(part)
            if not (bound is None or isinstance(bound, int)):
                raise self.error(f"slice bounds must be integers, not {_type_name(bound)}", part or node)
            bounds.append(bound)
        if bounds[2] == 0:
            raise self.error("slice step cannot be zero", node.step or node)
        result = value[slice(*bounds)]
        self.spend(len(result))
        return result

    # -- calls -----------------------------------------------------------------------------------------------------

    def call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name):
            raise self.not_allowed(node.func, "calling")
        name = node.func.id
        function = _FUNCTIONS.get(name)
        if function is None:
            hint = _did_you_mean(name, FUNCTIONS) or f"allowed functions: {', '.join(FUNCTIONS)}"
            raise self.error(f"function '{name}' is not allowed in expressions", node.func, hint)
        args = [self.visit(arg) for arg in node.args]
        kwargs: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise self.not_allowed(keyword, "unpacking")
            if keyword.arg not in function.keywords:
                accepted = ", ".join(sorted(function.keywords)) or "none"
                raise self.error(
                    f"{name}() takes no keyword argument '{keyword.arg}'",
                    keyword,
                    hint=f"keywords accepted: {accepted}",
                )
            kwargs[keyword.arg] = self.visit(keyword.value)
        if function.heavy:
            for arg in (*args, *kwargs.values()):
                self.weigh(arg)
        try:
            result = function.impl(*args, **kwargs)
        except _CallError as e:
            raise self.error(str(e), node) from None
        except (TypeError, ValueError, OverflowError, ZeroDivisionError, RecursionError) as e:
            message = str(e) if str(e).startswith(name) else f"{name}(): {e}"
            raise self.error(message, node) from None
        if isinstance(result, list):
            self.spend(len(result))
        return self.check_size(self.check_number(result, node), node)

    # -- comprehensions --------------------------------------------------------------------------------------------

    def list_comprehension(self, node: ast.ListComp | ast.GeneratorExp) -> list[Any]:
        result: list[Any] = []
        room = [MAX_ELEMENTS]

        def emit() -> None:
            value = self.visit(node.elt)
            room[0] -= max(1, self.weigh(value, room[0])) if isinstance(value, list | tuple | dict | str) else 1
            if room[0] < 0:
                raise self.error(f"result too large (more than {MAX_ELEMENTS:,} elements)", node)
            result.append(value)

        self.comprehension(node.generators, emit)
        return result

    def dict_comprehension(self, node: ast.DictComp) -> dict[Any, Any]:
        result: dict[Any, Any] = {}

        def emit() -> None:
            self.set_item(result, self.visit(node.key), self.visit(node.value), node.key)

        self.comprehension(node.generators, emit)
        return self.check_size(result, node)

    def comprehension(self, generators: list[ast.comprehension], emit: Callable[[], None]) -> None:
        """Run the ``for``/``if`` clauses, calling ``emit`` for each combination that passes the filters.

        As in Python, the first iterable is evaluated in the enclosing scope and the comprehension's variables live
        in a scope of their own that shadows the enclosing ones and ends with it.
        """
        first = self.iterable(generators[0].iter)
        self.frames.append({})
        try:
            self.clause(generators, 0, first, emit)
        finally:
            self.frames.pop()

    def clause(
        self, generators: list[ast.comprehension], index: int, items: Iterable[Any], emit: Callable[[], None]
    ) -> None:
        gen = generators[index]
        if gen.is_async:
            raise self.not_allowed(gen.iter, "async comprehension")
        for item in items:
            self.iterations += 1
            if self.iterations > MAX_ITERATIONS:
                raise self.error(
                    f"comprehension runs more than {MAX_ITERATIONS:,} iterations", gen.iter, hint="use smaller ranges"
                )
            self.bind(gen.target, item)
            if gen.ifs and not all(self.visit(cond) for cond in gen.ifs):
                continue
            if index + 1 == len(generators):
                emit()
            else:
                self.clause(generators, index + 1, self.iterable(generators[index + 1].iter), emit)

    def iterable(self, node: ast.expr) -> Iterable[Any]:
        value = self.visit(node)
        if isinstance(value, list | tuple | str):
            return value
        if isinstance(value, Mapping):
            return list(value)
        raise self.error(f"cannot iterate over {_a(value)}", node)

    def bind(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name):
            if target.id in _ALIASES:
                raise self.error(f"'{target.id}' is a literal and cannot be a variable", target)
            self.frames[-1][target.id] = value
        elif isinstance(target, ast.Tuple | ast.List):
            if not isinstance(value, list | tuple):
                raise self.error(f"cannot unpack {_a(value)} into {len(target.elts)} names", target)
            if len(value) != len(target.elts):
                raise self.error(f"cannot unpack {_describe_length(value)} into {len(target.elts)} names", target)
            for sub_target, sub_value in zip(target.elts, value, strict=True):
                self.bind(sub_target, sub_value)
        else:
            raise self.not_allowed(target, "comprehension target")


_ARITHMETIC: Final[dict[type[ast.AST], Callable[[_Evaluator, ast.BinOp, Any, Any], Any]]] = {
    ast.Add: _Evaluator.add,
    ast.Sub: _Evaluator.numeric,
    ast.Mult: _Evaluator.multiply,
    ast.Div: _Evaluator.numeric,
    ast.FloorDiv: _Evaluator.numeric,
    ast.Mod: _Evaluator.numeric,
    ast.Pow: _Evaluator.power,
}

_HANDLERS: Final[dict[type[ast.expr], Callable[[_Evaluator, Any], Any]]] = {
    ast.Constant: _Evaluator.constant,
    ast.Name: _Evaluator.name,
    ast.List: _Evaluator.sequence,
    ast.Tuple: _Evaluator.sequence,
    ast.Dict: _Evaluator.dict_display,
    ast.UnaryOp: _Evaluator.unary,
    ast.BinOp: _Evaluator.binary,
    ast.BoolOp: _Evaluator.boolean,
    ast.IfExp: _Evaluator.if_else,
    ast.Compare: _Evaluator.compare,
    ast.Subscript: _Evaluator.subscript,
    ast.Call: _Evaluator.call,
    ast.ListComp: _Evaluator.list_comprehension,
    ast.GeneratorExp: _Evaluator.list_comprehension,
    ast.DictComp: _Evaluator.dict_comprehension,
}
