"""Symbolic sizes and tensor types: what flows between blocks, as a function of the input height and width.

Every spatial size in a blockgraph model is an :class:`Expr` in the input symbols (``H``, ``W``): an integer-affine
combination of symbols and floors, exactly the arithmetic of convolution and pooling output sizes
(``(H + 2*p - k)//s + 1``). Expressions are kept in a canonical form, so sizes that are equal for every input compare
equal as far as cheaply possible: ``(H + 2*1 - 3)//2 + 1 == (H + 1)//2`` and ``(H//4)//2 == H//8``.

What a model requires of its input is a set of :class:`Constraint` (``H//32 >= 1``, ``(H//4) % 7 == 0``);
:func:`solve` turns them into the exact set of accepted sizes per symbol (:class:`SizeSet`), which can be described
to a person (``H >= 224 and H % 32 == 0``) and asked for the nearest accepted size.

A :class:`TensorType` is the static type of a tensor between blocks: its layout (image, tokens, vector), channels
and symbolic grid.

Example::

    >>> H, W = Expr.sym("H"), Expr.sym("W")
    >>> h = (H + 2 * 3 - 7) // 2 + 1  # 7x7 stem conv, stride 2, padding 3
    >>> str(h), str((h + 2 * 1 - 3) // 2 + 1)  # then a 3x3 max pool, stride 2, padding 1
    ('(H + 1)//2', '(H + 3)//4')
    >>> solve([Constraint.ge(H // 32, 1), Constraint.divisible(H // 4, 7)]).describe()
    ['H in {28k, 28k+1, 28k+2, 28k+3}, H >= 56']
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any, Literal, TypeAlias, overload

__all__ = [
    "describe_value",
    "Acceptance",
    "Atom",
    "Constraint",
    "ConstraintKind",
    "Expr",
    "Floor",
    "Layout",
    "SizeSet",
    "Sym",
    "TensorType",
    "as_expr",
    "ceil_div",
    "solve",
]

_MAX_EVALUATIONS = 4_000_000
"""Most expression evaluations :func:`solve` spends on one symbol before it reports the constraints as text."""

_MAX_EXAMPLE_COMBINATIONS = 4096
"""Most candidate tuples :meth:`Acceptance.examples` looks at."""


# --------------------------------------------------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sym:
    """A symbol: a named positive integer, such as the input height ``H``."""

    name: str

    @property
    def _key(self) -> tuple[Any, ...]:
        """Sort key of an atom: symbols by name first, then floors (by inner expression, then divisor)."""
        return (0, self.name)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Floor:
    """``floor(expr / divisor)`` with ``divisor >= 2``, kept canonical: build it with ``expr // divisor``.

    In canonical form every coefficient of ``expr`` and its constant lie in ``[0, divisor)``, their gcd with the
    divisor is 1, and ``expr`` is not a lone floor plus integers (that is merged into one floor).
    """

    expr: Expr
    divisor: int

    @cached_property
    def _key(self) -> tuple[Any, ...]:
        return (1, self.expr._key, self.divisor)

    def __str__(self) -> str:
        return _format_atom(self, None)


Atom: TypeAlias = Sym | Floor
"""A non-constant building block of an :class:`Expr`."""


def _build(coefficients: Mapping[Atom, int], constant: int) -> Expr:
    """The canonical :class:`Expr` ``sum(c * atom) + constant`` (zero coefficients dropped, atoms sorted)."""
    terms = tuple(sorted(((a, c) for a, c in coefficients.items() if c), key=lambda t: t[0]._key))
    return Expr(terms, constant)


@dataclass(frozen=True, eq=False)
class Expr:
    """An integer expression ``sum(c_i * atom_i) + constant`` in symbols and floors, in canonical form.

    Build expressions with :meth:`sym`, :meth:`const` and the operators ``+ - * // %`` (Python ints mix in
    anywhere); do not call the constructor with hand-made terms. Expressions are immutable and hashable, compare
    structurally, and a constant expression compares (and hashes) equal to its int: ``Expr.const(3) == 3``.

    Multiplying two non-constant expressions raises :class:`TypeError`: sizes stay affine in their atoms.
    """

    terms: tuple[tuple[Atom, int], ...] = ()
    """``(atom, coefficient)`` pairs, nonzero coefficients, symbols sorted by name first, then floors."""
    constant: int = 0
    """The additive constant."""

    # -- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def sym(cls, name: str) -> Expr:
        """The symbol ``name`` (a Python identifier, so that generated code can use it)."""
        if not name.isidentifier():
            raise ValueError(f"symbol name {name!r} is not a Python identifier")
        return cls(((Sym(name), 1),), 0)

    @classmethod
    def const(cls, value: int) -> Expr:
        """The constant ``value``."""
        return cls((), int(value))

    # -- structure ---------------------------------------------------------------------------------------------------

    @cached_property
    def _key(self) -> tuple[Any, ...]:
        return (tuple((a._key, c) for a, c in self.terms), self.constant)

    @cached_property
    def _hash(self) -> int:
        return hash(self.constant) if not self.terms else hash((self.terms, self.constant))

    def __hash__(self) -> int:
        return self._hash

    def __getstate__(self) -> dict[str, Any]:
        # Fields only: cached closures do not pickle, and cached hashes differ between processes.
        return {"terms": self.terms, "constant": self.constant}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Expr):
            return self.constant == other.constant and self.terms == other.terms
        if isinstance(other, int):
            return not self.terms and self.constant == other
        return NotImplemented

    @property
    def is_const(self) -> bool:
        """Whether the expression is a constant."""
        return not self.terms

    @property
    def const_value(self) -> int | None:
        """The value of a constant expression, ``None`` if it depends on a symbol."""
        return None if self.terms else self.constant

    @cached_property
    def symbols(self) -> frozenset[str]:
        """The symbols the expression depends on."""
        names: set[str] = set()
        for atom, _ in self.terms:
            if isinstance(atom, Sym):
                names.add(atom.name)
            else:
                names |= atom.expr.symbols
        return frozenset(names)

    def is_monotone(self) -> bool:
        """Whether the expression is nondecreasing in every symbol: every coefficient at every level is ``>= 0``.

        (Inside a canonical floor every coefficient is already nonnegative, so this looks at the top level and the
        floors' insides.) A ``False`` answer is conservative: ``H - H//2`` is nondecreasing but not reported so.
        """
        return all(c >= 0 and (isinstance(a, Sym) or a.expr.is_monotone()) for a, c in self.terms)

    def slope(self, symbol: str) -> Fraction:
        """The average growth of the expression per unit of ``symbol`` (``1/4`` for ``(H + 3)//4``, ``0`` if absent).

        Exactly: ``e(symbol + P) == e + slope * P`` for the period ``P`` of the expression in that symbol.
        """
        return _period_slope(self, symbol)[1]

    # -- arithmetic --------------------------------------------------------------------------------------------------

    def __add__(self, other: Expr | int) -> Expr:
        o = _coerce(other)
        if o is None:
            return NotImplemented
        coefficients = dict(self.terms)
        for atom, c in o.terms:
            coefficients[atom] = coefficients.get(atom, 0) + c
        return _build(coefficients, self.constant + o.constant)

    __radd__ = __add__

    def __neg__(self) -> Expr:
        return Expr(tuple((a, -c) for a, c in self.terms), -self.constant)

    def __pos__(self) -> Expr:
        return self

    def __sub__(self, other: Expr | int) -> Expr:
        o = _coerce(other)
        if o is None:
            return NotImplemented
        return self + (-o)

    def __rsub__(self, other: int) -> Expr:
        o = _coerce(other)
        if o is None:
            return NotImplemented
        return o - self

    def __mul__(self, other: Expr | int) -> Expr:
        o = _coerce(other)
        if o is None:
            return NotImplemented
        if o.terms and self.terms:
            raise TypeError(
                f"cannot multiply ({self}) by ({o}): both are symbolic, and a size expression must stay affine "
                "(multiply by an int instead)"
            )
        if o.terms:
            return o * self.constant
        k = o.constant
        if k == 0:
            return Expr()
        return Expr(tuple((a, c * k) for a, c in self.terms), self.constant * k)

    __rmul__ = __mul__

    def __floordiv__(self, other: Expr | int) -> Expr:
        return _floor(self, _divisor(self, other, "//"))

    def __rfloordiv__(self, other: int) -> Expr:
        o = _coerce(other)
        if o is None:
            return NotImplemented
        return o // self

    def __mod__(self, other: Expr | int) -> Expr:
        d = _divisor(self, other, "%")
        return self - (self // d) * d

    def __rmod__(self, other: int) -> Expr:
        o = _coerce(other)
        if o is None:
            return NotImplemented
        return o % self

    # -- evaluation --------------------------------------------------------------------------------------------------

    @cached_property
    def _env_fn(self) -> Callable[[Any], int]:
        return _compile(self, _env_leaf)

    def evaluate(self, env: Mapping[str, int]) -> int:
        """The value of the expression for the symbol values in ``env``.

        Raises:
            ValueError: a symbol of the expression has no value in ``env``.
        """
        try:
            return self._env_fn(env)
        except KeyError:
            missing = sorted(self.symbols - set(env))
            raise ValueError(f"cannot evaluate {self}: no value for symbol {', '.join(map(repr, missing))}") from None

    def substitute(self, mapping: Mapping[str, Expr | int]) -> Expr:
        """The expression with each symbol named in ``mapping`` replaced by its value (others stay), re-normalized."""
        result = Expr.const(self.constant)
        for atom, c in self.terms:
            if isinstance(atom, Sym):
                value = mapping.get(atom.name)
                part = Expr(((atom, 1),), 0) if value is None else as_expr(value)
            else:
                part = atom.expr.substitute(mapping) // atom.divisor
            result = result + part * c
        return result

    # -- text --------------------------------------------------------------------------------------------------------

    def __str__(self) -> str:
        return _format(self, None)

    def __repr__(self) -> str:
        return f"Expr({_format(self, None)!r})"

    def to_python(self, names: Mapping[str, str] | None = None) -> str:
        """A Python expression computing this value, with symbols renamed by ``names`` (unnamed ones keep theirs).

        The text uses only ``+ - * //``, ints and the names, with the parentheses that Python's precedence needs
        (``2*(h0//4) - 1``), so it can be pasted into generated code.
        """
        return _format(self, names or {})

    @property
    def is_sum(self) -> bool:
        """Whether :func:`str` gives a sum (needs parentheses before ``*``, ``//`` or ``%``)."""
        return len(self.terms) + (1 if self.constant and self.terms else 0) > 1


def as_expr(value: Expr | int) -> Expr:
    """``value`` as an :class:`Expr` (an int becomes a constant).

    Raises:
        TypeError: ``value`` is neither an :class:`Expr` nor an int.
    """
    e = _coerce(value)
    if e is None:
        raise TypeError(f"expected a size expression or an int, got {type(value).__name__} {value!r}")
    return e


def ceil_div(e: Expr | int, d: int) -> Expr:
    """``ceil(e / d)`` for a positive int ``d``, as ``(e + d - 1)//d``."""
    x = as_expr(e)
    return (x + (_divisor(x, d, "ceil_div") - 1)) // d


def _coerce(value: object) -> Expr | None:
    if isinstance(value, Expr):
        return value
    if isinstance(value, int):
        return Expr((), int(value))
    return None


def _divisor(e: Expr, d: object, op: str) -> int:
    """``d`` as a positive int divisor, or a clear error."""
    if isinstance(d, Expr):
        if d.terms:
            raise TypeError(f"cannot compute ({e}) {op} ({d}): the divisor must be an int, not a symbolic size")
        d = d.constant
    if not isinstance(d, int):
        raise TypeError(f"cannot compute ({e}) {op} {d!r}: the divisor must be an int")
    if d <= 0:
        raise ValueError(f"cannot compute ({e}) {op} {d}: the divisor must be a positive int")
    return int(d)


def _floor(e: Expr, d: int) -> Expr:
    """Canonical ``floor(e / d)`` for ``d >= 1``.

    Steps: pull every multiple of ``d`` out of the coefficients and the constant (``floor((a + q*d)/d) = floor(a/d)
    + q``); divide the remainder and ``d`` by the gcd of its coefficients and ``d``; merge a lone inner floor
    (``floor((floor(a/m) + x)/n) = floor((a + m*x)/(m*n))`` for integer ``x``).
    """
    if d == 1:
        return e
    if not e.terms:
        return Expr((), e.constant // d)
    outer: dict[Atom, int] = {}
    inner: dict[Atom, int] = {}
    for atom, c in e.terms:
        q, r = divmod(c, d)
        if q:
            outer[atom] = q
        if r:
            inner[atom] = r
    q, k = divmod(e.constant, d)
    pulled = _build(outer, q)
    if not inner:  # 0 <= k < d
        return pulled
    g = math.gcd(d, *inner.values())
    if g > 1:  # floor((g*x + k)/(g*n)) = floor((x + floor(k/g))/n)
        inner = {a: c // g for a, c in inner.items()}
        k //= g
        d //= g
    floors = [a for a in inner if isinstance(a, Floor)]
    if len(floors) == 1 and inner[floors[0]] == 1:
        lone = floors[0]
        rest = _build({a: c for a, c in inner.items() if a != lone}, k)
        return pulled + _floor(lone.expr + rest * lone.divisor, lone.divisor * d)
    return pulled + Expr(((Floor(_build(inner, k), d), 1),), 0)


def _period_slope(e: Expr, symbol: str) -> tuple[int, Fraction]:
    """``(P, s)`` such that ``e(symbol + P) == e + s*P`` at every integer point, ``s*P`` an integer."""
    period, slope = 1, Fraction(0)
    for atom, c in e.terms:
        if isinstance(atom, Sym):
            p, s = 1, Fraction(1 if atom.name == symbol else 0)
        else:
            pa, sa = _period_slope(atom.expr, symbol)
            step = sa * pa
            assert step.denominator == 1, f"period {pa} of {atom.expr} is not integral"
            k = atom.divisor // math.gcd(step.numerator, atom.divisor)
            p, s = pa * k, sa / atom.divisor
        period = math.lcm(period, p)
        slope += c * s
    return period, slope


# -- compiling to closures (fast evaluation without eval) ------------------------------------------------------------


def _env_leaf(name: str) -> Callable[[Any], int]:
    return lambda env: int(env[name])


def _identity_leaf(name: str) -> Callable[[Any], int]:
    return int  # every symbol reads the one value given


def _compile(e: Expr, leaf: Callable[[str], Callable[[Any], int]]) -> Callable[[Any], int]:
    """A closure computing ``e``, symbols read through ``leaf(name)``."""
    parts = [(_compile_atom(a, leaf), c) for a, c in e.terms]
    k = e.constant
    if not parts:
        return lambda x: k
    if len(parts) == 1:
        f, c = parts[0]
        if c == 1 and k == 0:
            return f
        return lambda x: c * f(x) + k
    if len(parts) == 2:
        (f1, c1), (f2, c2) = parts
        return lambda x: c1 * f1(x) + c2 * f2(x) + k
    return lambda x: sum(c * f(x) for f, c in parts) + k


def _compile_atom(atom: Atom, leaf: Callable[[str], Callable[[Any], int]]) -> Callable[[Any], int]:
    if isinstance(atom, Sym):
        return leaf(atom.name)
    f, d = _compile(atom.expr, leaf), atom.divisor
    return lambda x: f(x) // d


# -- formatting ------------------------------------------------------------------------------------------------------


def _format_atom(atom: Atom, names: Mapping[str, str] | None) -> str:
    """``H`` or ``H//4`` or ``(H + 1)//2``: an atom as Python text binding as tightly as ``//``."""
    if isinstance(atom, Sym):
        return names.get(atom.name, atom.name) if names else atom.name
    inner = atom.expr
    text = _format(inner, names)
    return f"{text}//{atom.divisor}" if _is_symbol(inner) else f"({text})//{atom.divisor}"


def _is_symbol(e: Expr) -> bool:
    return not e.constant and len(e.terms) == 1 and e.terms[0][1] == 1 and isinstance(e.terms[0][0], Sym)


def _format(e: Expr, names: Mapping[str, str] | None) -> str:
    """Python text for ``e``: terms in canonical order, then the constant; parenthesized where precedence needs it."""
    if not e.terms:
        return str(e.constant)
    out: list[str] = []
    for i, (atom, c) in enumerate(e.terms):
        text = _format_atom(atom, names)
        if isinstance(atom, Floor) and (abs(c) != 1 or (i == 0 and c < 0)):
            text = f"({text})"  # 2*(H//4), -(H//4): '2*H//4' and '-H//4' would mean (2*H)//4 and (-H)//4
        magnitude = text if abs(c) == 1 else f"{abs(c)}*{text}"
        if i == 0:
            out.append(magnitude if c > 0 else f"-{magnitude}")
        else:
            out.append(f" + {magnitude}" if c > 0 else f" - {magnitude}")
    if e.constant:
        out.append(f" + {e.constant}" if e.constant > 0 else f" - {-e.constant}")
    return "".join(out)


def _factor(e: Expr) -> str:
    """``e`` as text fit for a factor of a product: parenthesized unless it is a symbol or a nonnegative int."""
    text = _format(e, None)
    return text if _is_symbol(e) or (not e.terms and e.constant >= 0) else f"({text})"


def _paren(e: Expr, names: Mapping[str, str] | None = None) -> str:
    """``e`` as text fit for a factor of ``*``/``%``: parenthesized unless it is a single symbol, floor or int."""
    text = _format(e, names)
    if e.is_sum or (e.terms and (e.terms[0][1] != 1)) or (not e.terms and e.constant < 0):
        return f"({text})"
    return text


# --------------------------------------------------------------------------------------------------------------------
# Constraints
# --------------------------------------------------------------------------------------------------------------------

ConstraintKind: TypeAlias = Literal["ge", "eq", "divisible"]


@dataclass(frozen=True)
class Constraint:
    """A requirement on the input sizes: ``expr >= value``, ``expr == value`` or ``expr % value == 0``.

    ``str()`` gives Python-like text with negative terms moved to the right-hand side: ``H//32 >= 1``,
    ``H//16 == 14``, ``H//4 % 7 == 0``, ``H == W``, ``(H + 1) % 2 == 0``.
    """

    expr: Expr
    kind: ConstraintKind
    value: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "expr", as_expr(self.expr))
        if not isinstance(self.value, int):
            raise TypeError(f"a constraint's value must be an int, got {type(self.value).__name__} {self.value!r}")
        if self.kind not in ("ge", "eq", "divisible"):
            raise ValueError(f"constraint kind must be 'ge', 'eq' or 'divisible', got {self.kind!r}")
        if self.kind == "divisible" and self.value < 1:
            raise ValueError(f"a divisibility constraint needs a positive modulus, got {self.value}")

    @classmethod
    def ge(cls, expr: Expr | int, value: Expr | int) -> Constraint:
        """``expr >= value``; a symbolic ``value`` is moved to the left (``expr - value >= 0``)."""
        return cls._of(expr, "ge", value)

    @classmethod
    def eq(cls, expr: Expr | int, value: Expr | int) -> Constraint:
        """``expr == value``; a symbolic ``value`` is moved to the left (``expr - value == 0``)."""
        return cls._of(expr, "eq", value)

    @classmethod
    def _of(cls, expr: Expr | int, kind: ConstraintKind, value: Expr | int) -> Constraint:
        right = as_expr(value)
        return cls(as_expr(expr) - (right - right.constant), kind, right.constant)

    @classmethod
    def divisible(cls, expr: Expr | int, value: int) -> Constraint:
        """``expr % value == 0`` (``value >= 1``)."""
        return cls(as_expr(expr), "divisible", value)

    @property
    def symbols(self) -> frozenset[str]:
        """The symbols the constraint mentions."""
        return self.expr.symbols

    def holds(self, env: Mapping[str, int]) -> bool:
        """Whether the constraint holds for the symbol values in ``env`` (``ValueError`` if one is missing)."""
        v = self.expr.evaluate(env)
        if self.kind == "ge":
            return v >= self.value
        if self.kind == "eq":
            return v == self.value
        return v % self.value == 0

    def __getstate__(self) -> dict[str, Any]:
        return {"expr": self.expr, "kind": self.kind, "value": self.value}  # fields only, no cached closure

    @cached_property
    def _predicate(self) -> Callable[[int], bool]:
        """A fast ``v -> holds`` with every symbol set to ``v`` (meant for constraints on one symbol)."""
        f, value = _compile(self.expr, _identity_leaf), self.value
        if self.kind == "ge":
            return lambda v: f(v) >= value
        if self.kind == "eq":
            return lambda v: f(v) == value
        return lambda v: f(v) % value == 0

    def __str__(self) -> str:
        return self.to_python()

    def to_python(self, names: Mapping[str, str] | None = None) -> str:
        """A Python boolean expression for the constraint, symbols renamed by ``names``."""
        e = self.expr
        if self.kind == "divisible":
            return f"{_paren(e, names)} % {self.value} == 0"
        op = ">=" if self.kind == "ge" else "=="
        if not e.terms:
            return f"{e.constant} {op} {self.value}"
        left = Expr(tuple((a, c) for a, c in e.terms if c > 0), 0)
        right = Expr(tuple((a, -c) for a, c in e.terms if c < 0), self.value - e.constant)
        if not left.terms and right.terms:  # -H >= -100  ->  H <= 100
            op = "<=" if op == ">=" else op
            left, right = right - right.constant, Expr.const(-right.constant)
        return f"{_format(left, names)} {op} {_format(right, names)}"


# --------------------------------------------------------------------------------------------------------------------
# Solving: the accepted sizes
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeSet:
    """The exact set of sizes ``v >= 1`` that one symbol may take, given the constraints on that symbol alone.

    An accepted value is either in ``finite`` (explicit values, all below ``start``) or ``>= start`` with
    ``v % period in residues``. ``start`` is ``None`` when the set is finite. Such a set is exact for every
    constraint built from floor-affine expressions, which are eventually periodic.

    When solving would cost too much (huge periods, thresholds beyond the scan limit ``upper``), ``exact`` is
    ``False``: the set then answers :meth:`contains` by evaluating ``constraints`` and describes itself with them.
    """

    minimum: int | None
    """The smallest accepted value; ``None`` if there is none (or, when not ``exact``, none up to ``upper``)."""
    period: int = 1
    residues: frozenset[int] = frozenset()
    start: int | None = None
    finite: frozenset[int] = frozenset()
    constraints: tuple[Constraint, ...] = ()
    """The single-symbol constraints this set was solved from."""
    exact: bool = True
    upper: int = 65536
    """The scan limit it was solved with (bounds the searches of an inexact set)."""

    @classmethod
    def everything(cls) -> SizeSet:
        """Every size ``>= 1`` (no constraint)."""
        return cls(minimum=1, period=1, residues=frozenset({0}), start=1)

    @property
    def is_empty(self) -> bool:
        """Whether no size is accepted (when not ``exact``: none up to ``upper``)."""
        return self.minimum is None

    @property
    def unconstrained(self) -> bool:
        """Whether no constraint restricts the symbol."""
        return not self.constraints

    @property
    def maximum(self) -> int | None:
        """The largest accepted value of a finite set; ``None`` if unbounded, empty or not ``exact``."""
        if not self.exact or self.start is not None or not self.finite:
            return None
        return max(self.finite)

    def contains(self, v: int) -> bool:
        """Whether the size ``v`` is accepted."""
        if v < 1:
            return False
        if not self.exact:
            return all(c._predicate(v) for c in self.constraints)
        if v in self.finite:
            return True
        return self.start is not None and v >= self.start and v % self.period in self.residues

    def values(self) -> Iterator[int]:
        """The accepted values in increasing order (endless for an unbounded set; up to ``upper`` if not exact)."""
        if not self.exact:
            if self.minimum is not None:
                yield from (v for v in range(self.minimum, self.upper + 1) if self.contains(v))
            return
        yield from sorted(self.finite)
        if self.start is None:
            return
        base = self.start - self.start % self.period
        residues = sorted(self.residues)
        while True:
            for r in residues:
                if base + r >= self.start:
                    yield base + r
            base += self.period

    def nearest(self, v: int) -> tuple[int | None, int | None]:
        """The accepted values nearest ``v``: ``(largest <= v, smallest >= v)``, ``None`` where there is none.

        Both are ``v`` when ``v`` is accepted. Use it for hints: ``try 224 or 256``.
        """
        if not self.exact:  # bounded scans, from the known minimum
            if self.minimum is None:
                return None, None
            down = next(
                (x for x in range(min(v, self.minimum + self.upper), self.minimum - 1, -1) if self.contains(x)), None
            )
            w = max(v, self.minimum)
            return down, next((x for x in range(w, w + self.upper) if self.contains(x)), None)
        below = [x for x in self.finite if x <= v]
        above = [x for x in self.finite if x >= v]
        if self.start is not None:
            p = self.period
            if v >= self.start:
                below += [x for x in (v - (v - r) % p for r in self.residues) if x >= self.start]
            w = max(v, self.start)
            above += [w + (r - w) % p for r in self.residues]
        return (max(below) if below else None), (min(above) if above else None)

    def describe(self, symbol: str = "H") -> str:
        """Short text for the set: ``H >= 32``, ``H >= 224 and H % 32 == 0``, ``H == 224``, ``224 <= H <= 239``,
        ``H in {28k, 28k+1, 28k+2, 28k+3}, H >= 28``, ``H in {10, 12} or H >= 20``, ``no H``.

        A set that is not ``exact`` is described by its constraints joined with ``and``.
        """
        if not self.exact:
            return " and ".join(str(c) for c in self.constraints)
        if self.minimum is None:
            return f"no {symbol}"
        parts = []
        if self.finite:
            parts.append(_describe_finite(symbol, sorted(self.finite)))
        if self.start is not None:
            parts.append(self._describe_periodic(symbol))
        return " or ".join(parts)

    def _describe_periodic(self, symbol: str) -> str:
        assert self.start is not None
        p, start = self.period, self.start
        first = min(start + (r - start) % p for r in self.residues)
        if p == 1:
            return f"{symbol} >= {first}"
        residues = sorted(self.residues)
        natural = min(r or p for r in residues)  # the smallest v >= 1 of the pattern
        bound = f"{symbol} >= {first}"
        if len(residues) == 1:
            text = f"{symbol} % {p} == {residues[0]}"
            return text if first == natural else f"{bound} and {text}"

        def item(r: int) -> str:
            return f"{p}k+{r}" if r else f"{p}k"

        if len(residues) <= 4:
            items = [item(r) for r in residues]
        else:
            items = [item(a) if a == b else f"{item(a)}..{item(b)}" for a, b in _runs(residues)]
        text = f"{symbol} in {{{', '.join(items)}}}"
        return text if first == natural else f"{text}, {bound}"


def _runs(values: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ints in sorted ``values``, as ``(first, last)``."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][1] == v - 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs


def _describe_finite(symbol: str, values: Sequence[int], limit: int = 8) -> str:
    runs = _runs(values)
    if len(runs) == 1:
        a, b = runs[0]
        return f"{symbol} == {a}" if a == b else f"{a} <= {symbol} <= {b}"
    items = [str(a) if a == b else (f"{a}, {b}" if b == a + 1 else f"{a}..{b}") for a, b in runs[:limit]]
    more = f", ... ({len(values)} values)" if len(runs) > limit else ""
    return f"{symbol} in {{{', '.join(items)}{more}}}"


_LOWER_BOUND = re.compile(r"(\w+) >= (\d+)")


def sizes_text(lines: Sequence[str]) -> str:
    """Accepted sizes (:meth:`Acceptance.describe`'s lines) as one line: ``any H, W >= 32`` when every size from a
    bound up is accepted, ``any H >= 4, W >= 8``, ``any size``; else the constraints joined by ``; ``."""
    bounds = [_LOWER_BOUND.fullmatch(line) for line in lines]
    if not lines:
        return "any size"
    if not all(bounds):
        return "; ".join(lines)
    values = {m.group(2) for m in bounds if m is not None}
    if len(values) == 1:
        return f"any {', '.join(m.group(1) for m in bounds if m is not None)} >= {values.pop()}"
    return "any " + ", ".join(lines)


@dataclass(frozen=True)
class Acceptance:
    """The input sizes a model accepts: a :class:`SizeSet` per symbol, plus constraints coupling several symbols.

    ``sizes`` holds every symbol of ``symbols`` (the requested ones, then any other symbol a single-symbol
    constraint mentioned). ``coupled`` holds the constraints on two or more symbols, and constant constraints that
    are false; they are only checked, not solved.
    """

    symbols: tuple[str, ...]
    sizes: dict[str, SizeSet] = field(hash=False)
    coupled: tuple[Constraint, ...] = ()

    def __getitem__(self, symbol: str) -> SizeSet:
        return self.sizes[symbol]

    @property
    def is_empty(self) -> bool:
        """Whether some symbol accepts no size at all (coupled constraints are not considered)."""
        return any(s.is_empty for s in self.sizes.values())

    def contains(self, env: Mapping[str, int]) -> bool:
        """Whether the sizes in ``env`` satisfy every constraint, coupled ones included.

        Raises:
            ValueError: a symbol has no value in ``env``.
        """
        for symbol in self.symbols:
            if symbol not in env:
                raise ValueError(f"no value for symbol {symbol!r}")
            if not self.sizes[symbol].contains(env[symbol]):
                return False
        return all(c.holds(env) for c in self.coupled)

    def describe(self) -> list[str]:
        """One line per constrained symbol (:meth:`SizeSet.describe`), then one per coupled constraint.

        Unconstrained symbols are left out, so ``[]`` means every size is accepted.
        """
        lines = [self.sizes[s].describe(s) for s in self.symbols if not self.sizes[s].unconstrained]
        return lines + [str(c) for c in self.coupled]

    def text(self) -> str:
        """:meth:`describe` as one line (:func:`sizes_text`): ``any H, W >= 32``."""
        return sizes_text(self.describe())

    def examples(self, n: int = 3) -> list[tuple[int, ...]]:
        """Up to ``n`` small accepted size tuples, in the order of ``symbols``, for hints.

        Square-ish tuples of the smallest accepted values come first: ``[(224, 224), (256, 256), (288, 288)]``.
        """
        if not self.symbols:
            return [()] if all(c.holds({}) for c in self.coupled) else []
        per = max(n, int(_MAX_EXAMPLE_COMBINATIONS ** (1 / len(self.symbols)) / 2))
        own = [list(itertools.islice(self.sizes[s].values(), per)) for s in self.symbols]
        if not all(own):
            return []
        # Each symbol also tries the accepted values nearest the others' smallest, so that square tuples come up.
        pool = {v for values in own for v in values[: max(n, per // len(own))]}
        candidates = []
        for symbol, first in zip(self.symbols, own, strict=True):
            near = (self.sizes[symbol].nearest(v)[1] for v in pool)
            candidates.append(sorted(set(first) | {v for v in near if v is not None}))
        combos = sorted(itertools.product(*candidates), key=lambda vs: (max(vs) - min(vs), max(vs), vs))
        fitting = (vs for vs in combos if all(c.holds(dict(zip(self.symbols, vs, strict=True))) for c in self.coupled))
        return list(itertools.islice(fitting, n))


def solve(constraints: Iterable[Constraint], symbols: Sequence[str] = ("H", "W"), *, upper: int = 65536) -> Acceptance:
    """The sizes accepted under ``constraints``: an exact :class:`SizeSet` per symbol, coupled constraints apart.

    Args:
        constraints: requirements on the input sizes (duplicates are ignored).
        symbols: the input symbols, in the order :meth:`Acceptance.examples` uses.
        upper: how far to scan for the periodic regime of a symbol; beyond it (or beyond a few million
            evaluations) the symbol's set is reported by its constraints (``SizeSet.exact`` is ``False``).
    """
    per_symbol: dict[str, list[Constraint]] = {s: [] for s in symbols}
    coupled: list[Constraint] = []
    for c in dict.fromkeys(constraints):
        names = c.expr.symbols
        if len(names) == 1:
            per_symbol.setdefault(next(iter(names)), []).append(c)
        elif names or not c.holds({}):
            coupled.append(c)
    order = tuple(symbols) + tuple(sorted(s for s in per_symbol if s not in symbols))
    sizes = {s: _solve_one(s, tuple(per_symbol[s]), upper) for s in order}
    return Acceptance(order, sizes, tuple(coupled))


def _solve_one(symbol: str, constraints: tuple[Constraint, ...], upper: int) -> SizeSet:
    """Solve the single-symbol ``constraints`` on ``symbol`` exactly, or fall back to an inexact set."""
    if not constraints:
        return SizeSet.everything()
    budget = _MAX_EVALUATIONS
    start, period, bound = 1, 1, None  # accepted set: periodic from `start`; nothing accepted from `bound` on
    slack = 0  # the bounds below are conservative by up to one period of the expression: scan that much further
    for c in constraints:
        p, slope = _period_slope(c.expr, symbol)
        if c.kind == "divisible":
            step = slope * p
            period = math.lcm(period, p * (c.value // math.gcd(step.numerator, c.value)))
            continue
        if slope == 0:
            period = math.lcm(period, p)
            continue
        # e(v) = slope*v + g(v) with g p-periodic; with slope = num/q, G = q*g is an integer.
        budget -= p
        if budget < 0:
            return _inexact(constraints, upper)
        slack = max(slack, p)
        f, num, q = _compile(c.expr, _identity_leaf), slope.numerator, slope.denominator  # v -> e(symbol=v)
        gs = [q * f(v) - num * v for v in range(p)]
        g_min, g_max = min(gs), max(gs)
        target = q * c.value
        if num > 0 and c.kind == "ge":  # true from ceil((target - g_min)/num) on
            start = max(start, -((g_min - target) // num))
        elif num > 0:  # eq: e > value from floor((target - g_min)/num) + 1 on
            bound = _min(bound, (target - g_min) // num + 1)
        else:  # ge or eq with negative slope: e < value from floor((g_max - target)/|num|) + 1 on
            bound = _min(bound, (g_max - target) // -num + 1)
    end = max(bound, 1) if bound is not None else start + period  # scan [1, end)
    if end - 1 > upper + slack or (end - 1) * len(constraints) > budget:
        return _inexact(constraints, upper)
    accepted = [False] + [True] * (end - 1)  # by size: 0 is never accepted, and "and" keeps it so
    for c in constraints:
        holds = c._predicate
        accepted = [a and holds(v) for v, a in enumerate(accepted)]
    if bound is not None:
        finite = frozenset(v for v in range(1, end) if accepted[v])
        return SizeSet(minimum=min(finite, default=None), finite=finite, constraints=constraints, upper=upper)
    bits = accepted[start:end]
    p = _minimal_period(bits)
    residues = frozenset((start + i) % p for i in range(p) if bits[i])
    if not residues:
        finite = frozenset(v for v in range(1, start) if accepted[v])
        return SizeSet(minimum=min(finite, default=None), finite=finite, constraints=constraints, upper=upper)
    while start > 1 and accepted[start - 1] == ((start - 1) % p in residues):
        start -= 1
    finite = frozenset(v for v in range(1, start) if accepted[v])
    first = min(finite) if finite else min(start + (r - start) % p for r in residues)
    return SizeSet(first, p, residues, start, finite, constraints, True, upper)


def _min(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def _minimal_period(bits: list[bool]) -> int:
    """The smallest period of the cyclic sequence ``bits``: the first divisor of its length it repeats with."""
    n = len(bits)
    return next(p for p in range(1, n + 1) if n % p == 0 and bits[p:] == bits[: n - p])


def _inexact(constraints: tuple[Constraint, ...], upper: int) -> SizeSet:
    """The fallback set: constraints kept as text, minimum found by a bounded scan."""
    limit = min(upper, _MAX_EVALUATIONS // len(constraints))
    holds = [c._predicate for c in constraints]
    first = next((v for v in range(1, limit + 1) if all(h(v) for h in holds)), None)
    return SizeSet(minimum=first, constraints=constraints, exact=False, upper=upper)


# --------------------------------------------------------------------------------------------------------------------
# Tensor types
# --------------------------------------------------------------------------------------------------------------------

Layout: TypeAlias = Literal["image", "tokens", "vector", "levels", "mask"]


@dataclass(frozen=True)
class TensorType:
    """The static type of a tensor flowing between blocks; the batch dimension ``B`` is implicit and first.

    Layouts:
        ``image``: ``[B, C, h, w]``.
        ``tokens``: ``[B, extra + h*w, C]``, tokens in row-major grid order after ``extra`` leading tokens (a class
        token, say).
        ``vector``: ``[B, C]``.
        ``levels``: ``[B, sum(h_l*w_l), C]``, the tokens of several maps concatenated in level order (a deformable
        encoder's memory); ``levels`` holds each map's grid.
        ``mask``: ``[B, h, w]`` booleans, True where the image is padding (a detection batch's padding mask); its
        one channel is nominal.

    ``grid`` is ``(h, w)`` for image and tokens (ints are turned into constant expressions), ``None`` otherwise.
    """

    layout: Layout
    channels: int
    grid: tuple[Expr, Expr] | None = None
    extra: int = 0
    levels: tuple[tuple[Expr, Expr], ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in ("image", "tokens", "vector", "levels", "mask"):
            raise ValueError(f"layout must be 'image', 'tokens', 'vector', 'levels' or 'mask', got {self.layout!r}")
        if self.channels < 1:
            raise ValueError(f"a tensor type needs at least one channel, got {self.channels}")
        if self.layout == "levels":
            if self.grid is not None or not self.levels:
                raise ValueError("a levels type has per-level grids and no grid")
            object.__setattr__(self, "levels", tuple((as_expr(h), as_expr(w)) for h, w in self.levels))
        elif self.levels:
            raise ValueError(f"only a levels type has levels, not {self.layout}")
        if self.layout in ("vector", "levels"):
            if self.grid is not None:
                raise ValueError(f"a {self.layout} type has no grid")
        else:
            if self.grid is None or len(self.grid) != 2:
                raise ValueError(f"a {self.layout} type needs a grid (h, w), got {self.grid!r}")
            object.__setattr__(self, "grid", (as_expr(self.grid[0]), as_expr(self.grid[1])))
        if self.extra < 0 or (self.extra and self.layout != "tokens"):
            raise ValueError(f"extra tokens must be >= 0 and only on tokens, got {self.extra} on {self.layout}")

    @classmethod
    def image(cls, channels: int, h: Expr | int, w: Expr | int) -> TensorType:
        """``[B, channels, h, w]``."""
        return cls("image", channels, (as_expr(h), as_expr(w)))

    @classmethod
    def mask(cls, h: Expr | int, w: Expr | int) -> TensorType:
        """``[B, h, w]`` booleans (True = padding)."""
        return cls("mask", 1, (as_expr(h), as_expr(w)))

    @classmethod
    def tokens(cls, channels: int, h: Expr | int, w: Expr | int, extra: int = 0) -> TensorType:
        """``[B, extra + h*w, channels]``."""
        return cls("tokens", channels, (as_expr(h), as_expr(w)), extra)

    @classmethod
    def vector(cls, channels: int) -> TensorType:
        """``[B, channels]``."""
        return cls("vector", channels)

    @classmethod
    def multilevel(cls, channels: int, grids: Sequence[tuple[Expr | int, Expr | int]]) -> TensorType:
        """``[B, sum(h*w for h, w in grids), channels]``."""
        return cls("levels", channels, None, 0, tuple((as_expr(h), as_expr(w)) for h, w in grids))

    def with_(self, **changes: Any) -> TensorType:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @property
    def symbols(self) -> frozenset[str]:
        """The symbols the grid (or the levels' grids) depend on."""
        grids = [self.grid] if self.grid is not None else list(self.levels)
        return frozenset().union(*(h.symbols | w.symbols for h, w in grids))

    @overload
    def shape(self, env: Mapping[str, int], batch: int) -> tuple[int, ...]: ...

    @overload
    def shape(self, env: Mapping[str, int], batch: str = "B") -> tuple[int | str, ...]: ...

    def shape(self, env: Mapping[str, int], batch: int | str = "B") -> tuple[int | str, ...]:
        """The concrete shape for the symbol values in ``env``, ``batch`` first.

        Raises:
            ValueError: a symbol of the grid has no value in ``env``.
        """
        if self.layout == "levels":
            return (batch, sum(h.evaluate(env) * w.evaluate(env) for h, w in self.levels), self.channels)
        if self.grid is None:
            return (batch, self.channels)
        h, w = (g.evaluate(env) for g in self.grid)
        if self.layout == "image":
            return (batch, self.channels, h, w)
        if self.layout == "mask":
            return (batch, h, w)
        return (batch, self.extra + h * w, self.channels)

    def _dims(self) -> list[str]:
        if self.layout == "levels":
            return [" + ".join(f"{_factor(h)}*{_factor(w)}" for h, w in self.levels), str(self.channels)]
        if self.grid is None:
            return [str(self.channels)]
        h, w = self.grid
        if self.layout == "image":
            return [str(self.channels), str(h), str(w)]
        if self.layout == "mask":
            return [str(h), str(w)]
        count = f"{_factor(h)}*{_factor(w)}"
        return [f"{self.extra} + {count}" if self.extra else count, str(self.channels)]

    def symbolic_shape(self, batch: str = "B") -> str:
        """The shape as text, batch first: ``[B, 64, H//4, W//4]``, ``[B, 1 + (H//4)*(W//4), 64]``."""
        return f"[{', '.join([batch, *self._dims()])}]"

    def __str__(self) -> str:
        return f"{self.layout}[{', '.join(self._dims())}]"

    def stride(self, symbols: Sequence[str] = ("H", "W")) -> int | None:
        """The reduction ``s`` of a grid that grows like ``(H//s, W//s)``, same along both axes; else ``None``.

        Exact: ``s`` is ``1/slope`` of each grid size in its own symbol (``(H + 1)//2`` has stride 2). A constant
        grid, an upsampled one, mixed symbols or different strides per axis give ``None``.
        """
        if self.grid is None:
            return None
        strides = []
        for size, symbol in zip(self.grid, symbols, strict=True):
            if size.symbols != {symbol}:
                return None
            slope = size.slope(symbol)
            if slope.numerator != 1:
                return None
            strides.append(slope.denominator)
        return strides[0] if strides[0] == strides[1] else None


def describe_value(
    value: TensorType | Mapping[str, TensorType], env: Mapping[str, int], batch: int = 1
) -> tuple[Any, Any]:
    """``(type text, concrete shape)`` of a node's value: one type, or a mapping of output ports to types."""
    if isinstance(value, TensorType):
        return str(value), list(value.shape(env, batch=batch))
    return {p: str(t) for p, t in value.items()}, {p: list(t.shape(env, batch=batch)) for p, t in value.items()}
