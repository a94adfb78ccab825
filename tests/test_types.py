"""Tests of blockgraph.types: symbolic sizes, constraints, solving, tensor types."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockgraph.types import Constraint, Expr, Floor, SizeSet, TensorType, as_expr, ceil_div, sizes_text, solve

H, W = Expr.sym("H"), Expr.sym("W")


def conv(e: Expr, k: int, s: int = 1, p: int = 0) -> Expr:
    """Output size of a convolution or pooling window."""
    return (e + 2 * p - k) // s + 1


# --------------------------------------------------------------------------------------------------------------------
# Expr: canonical form
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (conv(H, 3, 2, 1), (H + 1) // 2),
        (conv(H, 4, 4), H // 4),
        ((H // 4) // 2, H // 8),
        (conv(conv(H, 7, 2, 3), 3, 2, 1), (H + 3) // 4),  # ResNet stem: conv 7x7/2 then max pool 3x3/2
        (conv(H, 16, 16), H // 16),  # ViT patch embedding
        ((H + 8) // 4, H // 4 + 2),
        ((4 * H + 1) // 4, H),
        ((3 * H + 1) // 2, H + (H + 1) // 2),
        ((2 * H + 1) // 4, H // 2),  # gcd of coefficients and divisor
        ((H // 4 + 1) // 2, (H + 4) // 8),
        (H // 1, H),
        (Expr.const(7) // 2, Expr.const(3)),
        (Expr.const(-7) // 2, -4),
        (H - H, 0),
        (H + W - H, W),
        (3 * H - H * 2, H),
        (ceil_div(H, 4), (H + 3) // 4),
        (H % 4, H - 4 * (H // 4)),
        ((H + 4) % 4, H % 4),
        (Expr.const(10) % 4, 2),
        (as_expr(5), Expr.const(5)),
        (H // Expr.const(2), H // 2),
    ],
)
def test_canonical_equalities(left: Expr, right: Expr | int) -> None:
    assert left == right
    assert hash(left) == hash(right)


def test_different_sizes_are_not_equal() -> None:
    assert H // 4 != H // 8
    assert (H + 1) // 2 != H // 2
    assert H != W
    assert Expr.const(3) != 4
    assert H != "H"


def test_constants_fold_and_compare_with_ints() -> None:
    e = (Expr.const(224) + 2 * 1 - 3) // 2 + 1
    assert e.is_const and e.const_value == 112 and e == 112
    assert {e, 112} == {112}
    assert H.const_value is None and not H.is_const


@pytest.mark.parametrize(
    ("expr", "text"),
    [
        (H // 4, "H//4"),
        (conv(H, 3, 2, 1), "(H + 1)//2"),
        (2 * H - 3, "2*H - 3"),
        (conv(H, 32, 32), "H//32"),
        (Expr.const(7), "7"),
        (Expr.const(-3), "-3"),
        (-H, "-H"),
        (-(H // 4), "-(H//4)"),
        (2 * (H // 4) - 1, "2*(H//4) - 1"),
        (W - H // 4, "W - H//4"),
        (W // 4 + H // 4 + 1, "H//4 + W//4 + 1"),  # symbols sorted, floors after
        (H // 4 + W + H, "H + W + H//4"),
        ((3 * H + 1) // 2, "H + (H + 1)//2"),
        ((2 * H) // 3, "(2*H)//3"),
        (H - 4 * (H // 4), "H - 4*(H//4)"),
        ((H // 4 + W) // 2, "(H + 4*W)//8"),
    ],
)
def test_str(expr: Expr, text: str) -> None:
    assert str(expr) == text
    assert repr(expr) == f"Expr({text!r})"


def test_to_python_renames_symbols() -> None:
    assert conv(H, 3, 2, 1).to_python({"H": "h0"}) == "(h0 + 1)//2"
    assert (2 * (H // 4) - W).to_python({"H": "h", "W": "w"}) == "-w + 2*(h//4)"
    assert (H // 4).to_python({"W": "w"}) == "H//4"  # unnamed symbols keep their names


def test_symbols_substitute_and_evaluate() -> None:
    e = conv(H, 3, 2, 1) + W // 4
    assert e.symbols == {"H", "W"}
    assert Expr.const(3).symbols == frozenset()
    assert e.evaluate({"H": 224, "W": 100}) == 112 + 25
    assert e.substitute({"W": 2 * H}) == (H + 1) // 2 + H // 2
    assert e.substitute({"H": 223, "W": 8}) == 114
    assert (H // 4).substitute({"H": H // 2}) == H // 8


@pytest.mark.parametrize(
    ("action", "error", "match"),
    [
        (lambda: H * W, TypeError, "both are symbolic"),
        (lambda: H // 0, ValueError, "positive int"),
        (lambda: H // -2, ValueError, "positive int"),
        (lambda: H // W, TypeError, "must be an int"),
        (lambda: 5 // H, TypeError, "must be an int"),
        (lambda: H % W, TypeError, "must be an int"),
        (lambda: (H + W).evaluate({"H": 3}), ValueError, "'W'"),
        (lambda: Expr.sym("1x"), ValueError, "identifier"),
        (lambda: as_expr("H"), TypeError, "expected a size expression"),  # type: ignore[arg-type]
        (lambda: Constraint.divisible(H, 0), ValueError, "positive modulus"),
        (lambda: Constraint(H, "lt", 3), ValueError, "kind"),  # type: ignore[arg-type]
        (lambda: TensorType.vector(0), ValueError, "channel"),
        (lambda: TensorType("image", 3), ValueError, "needs a grid"),
        (lambda: TensorType("vector", 3, (H, W)), ValueError, "no grid"),
        (lambda: TensorType("image", 3, (H, W), extra=1), ValueError, "extra"),
    ],
)
def test_bad_input(action: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        action()


def test_monotone() -> None:
    assert conv(conv(H, 7, 2, 3), 3, 2, 1).is_monotone()
    assert (H + W // 2).is_monotone()
    assert not (-H).is_monotone()
    assert not (H % 4).is_monotone()


def test_slope() -> None:
    assert conv(H, 3, 2, 1).slope("H") == Fraction(1, 2)
    assert (H // 4 + W).slope("H") == Fraction(1, 4)
    assert (H // 4 + W).slope("W") == 1
    assert (H % 4).slope("H") == 0


def test_pickle_round_trip() -> None:
    e = conv(H, 3, 2, 1) + W
    c = Constraint.ge(e, 3)
    assert c.holds({"H": 9, "W": 1}) and hash(e)  # fill the caches first
    assert pickle.loads(pickle.dumps(e)) == e
    assert pickle.loads(pickle.dumps(c)) == c
    t = TensorType.tokens(64, H // 4, W // 4, extra=1)
    assert pickle.loads(pickle.dumps(t)) == t


# --------------------------------------------------------------------------------------------------------------------
# Expr: properties against plain Python arithmetic
# --------------------------------------------------------------------------------------------------------------------

Fn = Callable[[int, int], int]

_ops = st.one_of(
    st.tuples(st.just("add"), st.integers(-9, 9)),
    st.tuples(st.just("mul"), st.integers(1, 4)),
    st.tuples(st.just("div"), st.integers(1, 8)),
    st.tuples(st.just("conv"), st.integers(1, 7), st.integers(1, 4), st.integers(0, 3)),
    st.tuples(st.just("neg")),
    st.tuples(st.just("mod"), st.integers(1, 6)),
)


def _apply(op: tuple[Any, ...], e: Expr, f: Fn) -> tuple[Expr, Fn]:
    """Apply one op to an expression and, alongside, to a plain Python function computing the same value."""
    kind = op[0]
    if kind == "add":
        k = int(op[1])
        return e + k, lambda h, w: f(h, w) + k
    if kind == "mul":
        m = int(op[1])
        return m * e, lambda h, w: m * f(h, w)
    if kind == "div":
        d = int(op[1])
        return e // d, lambda h, w: f(h, w) // d
    if kind == "conv":
        k, s, p = (int(x) for x in op[1:])
        return conv(e, k, s, p), lambda h, w: (f(h, w) + 2 * p - k) // s + 1
    if kind == "neg":
        return -e, lambda h, w: -f(h, w)
    d = int(op[1])
    return e % d, lambda h, w: f(h, w) % d


@st.composite
def expressions(draw: st.DrawFn, symbols: tuple[str, ...] = ("H", "W")) -> tuple[Expr, Fn]:
    """A random floor-affine expression and a Python function computing it: one or two op chains, summed."""

    def chain(symbol: str) -> tuple[Expr, Fn]:
        e = Expr.sym(symbol)
        f: Fn = (lambda h, w: h) if symbol == "H" else (lambda h, w: w)
        for op in draw(st.lists(_ops, max_size=5)):
            e, f = _apply(op, e, f)
        return e, f

    e1, f1 = chain(draw(st.sampled_from(symbols)))
    if not draw(st.booleans()):
        return e1, f1
    e2, f2 = chain(draw(st.sampled_from(symbols)))
    sign = draw(st.sampled_from([1, -1]))
    return e1 + sign * e2, lambda h, w: f1(h, w) + sign * f2(h, w)


_POINTS = [(h, w) for h in (*range(1, 40), 97, 224, 1000, 4099) for w in (1, 3, 14, 225)]


@settings(max_examples=150, deadline=None)
@given(expressions())
def test_evaluate_matches_python(pair: tuple[Expr, Fn]) -> None:
    e, f = pair
    for h, w in _POINTS:
        assert e.evaluate({"H": h, "W": w}) == f(h, w), (str(e), h, w)


@settings(max_examples=150, deadline=None)
@given(expressions())
def test_to_python_round_trip(pair: tuple[Expr, Fn]) -> None:
    e, f = pair
    code = compile(e.to_python({"H": "h0", "W": "w0"}), "<expr>", "eval")
    assert compile(str(e), "<expr>", "eval")  # str() is valid Python too
    for h, w in _POINTS:
        assert eval(code, {"__builtins__": {}}, {"h0": h, "w0": w}) == f(h, w), (str(e), h, w)  # noqa: S307


@settings(max_examples=100, deadline=None)
@given(expressions(), st.integers(1, 6), st.integers(1, 6), st.integers(-5, 5))
def test_normalization_identities(pair: tuple[Expr, Fn], a: int, b: int, q: int) -> None:
    e, f = pair
    nested, flat = (e // a) // b, e // (a * b)
    assert all(nested.evaluate({"H": h, "W": w}) == flat.evaluate({"H": h, "W": w}) for h, w in _POINTS)
    assert (e + q * a) // a == e // a + q
    assert e.substitute({}) == e
    assert e.substitute({"H": Expr.sym("H")}) == e
    assert hash(e + 0) == hash(e)
    assert ceil_div(e, a) == (e + a - 1) // a
    for atom, _ in e.terms:  # canonical floors: inner coefficients in [0, d), lone inner floors merged
        if isinstance(atom, Floor):
            assert atom.divisor >= 2
            assert all(0 < c < atom.divisor for _, c in atom.expr.terms)
            assert 0 <= atom.expr.constant < atom.divisor


_conv_ops = st.one_of(
    st.tuples(st.just("add"), st.integers(-9, 9)),
    st.tuples(st.just("div"), st.integers(1, 8)),
    st.tuples(st.just("conv"), st.integers(1, 7), st.integers(1, 4), st.integers(0, 3)),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(_conv_ops, max_size=6), st.integers(1, 6), st.integers(1, 6))
def test_conv_chains_stay_one_floor(ops: list[tuple[Any, ...]], a: int, b: int) -> None:
    """Sizes after a chain of convs and pools are ``(H + k)//s + c``: one floor, and nested floors merge."""
    e: Expr = H
    f: Fn = lambda h, w: h  # noqa: E731
    for op in ops:
        e, f = _apply(op, e, f)
    assert len(e.terms) == 1 and e.terms[0][1] == 1
    assert (e // a) // b == e // (a * b)
    assert all(e.evaluate({"H": h}) == f(h, 0) for h in range(1, 300))


@settings(max_examples=100, deadline=None)
@given(expressions(symbols=("H",)))
def test_monotone_and_slope_are_sound(pair: tuple[Expr, Fn]) -> None:
    e, f = pair
    values = [f(h, 1) for h in range(1, 300)]
    if e.is_monotone():
        assert values == sorted(values), str(e)
    slope = e.slope("H")
    period = 840**5  # a multiple of every period the strategy can build
    for h in (1, 5, 17):
        assert f(h + period, 1) - f(h, 1) == slope * period, str(e)


# --------------------------------------------------------------------------------------------------------------------
# Constraints
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("constraint", "text"),
    [
        (Constraint.ge(H // 32, 1), "H//32 >= 1"),
        (Constraint.eq(H // 16, 14), "H//16 == 14"),
        (Constraint.divisible(H // 4, 7), "H//4 % 7 == 0"),
        (Constraint.divisible(H + 1, 2), "(H + 1) % 2 == 0"),
        (Constraint.divisible(2 * H, 3), "(2*H) % 3 == 0"),
        (Constraint.eq(H, W), "H == W"),
        (Constraint.ge(H // 4 - 7, 0), "H//4 >= 7"),
        (Constraint.ge(-H, -100), "H <= 100"),
        (Constraint.ge(H - W // 2, 3), "H >= W//2 + 3"),
        (Constraint.ge(3, 4), "3 >= 4"),
    ],
)
def test_constraint_str(constraint: Constraint, text: str) -> None:
    assert str(constraint) == text
    env = {"h": 9, "w": 4}
    python = constraint.to_python({"H": "h", "W": "w"})
    assert eval(python, {"__builtins__": {}}, env) == constraint.holds({"H": 9, "W": 4})  # noqa: S307


def test_constraint_holds() -> None:
    assert Constraint.ge(H // 32, 1).holds({"H": 32})
    assert not Constraint.ge(H // 32, 1).holds({"H": 31})
    assert Constraint.eq(H // 16, 14).holds({"H": 239})
    assert Constraint.divisible(H // 4, 7).holds({"H": 31})
    assert not Constraint.divisible(H // 4, 7).holds({"H": 32})
    with pytest.raises(ValueError, match="'H'"):
        Constraint.ge(H, 1).holds({})


# --------------------------------------------------------------------------------------------------------------------
# solve(): accepted sizes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("constraints", "text"),
    [
        ([Constraint.ge(H // 32, 1)], "H >= 32"),
        ([Constraint.divisible(H // 4, 7), Constraint.ge(H // 4, 1)], "H in {28k, 28k+1, 28k+2, 28k+3}, H >= 28"),
        ([Constraint.eq(H // 16, 14)], "224 <= H <= 239"),
        ([Constraint.eq(H, 224)], "H == 224"),
        ([Constraint.ge(H // 32, 7), Constraint.divisible(H, 32)], "H >= 224 and H % 32 == 0"),
        ([Constraint.divisible(H, 32)], "H % 32 == 0"),
        ([Constraint.divisible(H + 1, 2)], "H % 2 == 1"),
        ([Constraint.ge(H // 16, 1), Constraint.divisible(H // 16, 2)], "H in {32k..32k+15}, H >= 32"),
        ([Constraint.ge(H // 10 - H % 2, 1)], "H in {10, 12, 14, 16, 18} or H >= 20"),
        ([Constraint.eq(H // 16, 14), Constraint.divisible(H, 32)], "H == 224"),
        ([Constraint.eq(H // 16, 14), Constraint.divisible(H, 3)], "H in {225, 228, 231, 234, 237}"),
        ([Constraint.ge(-H, -100)], "1 <= H <= 100"),
        ([Constraint.ge(H // 4, 1), Constraint.ge(-(H // 4), -1)], "4 <= H <= 7"),
        ([Constraint.eq(H // 16, 14), Constraint.ge(H, 300)], "no H"),
        ([Constraint.ge(H // 16, 100_000)], "H//16 >= 100000"),  # beyond the scan limit: kept as text
    ],
)
def test_describe(constraints: list[Constraint], text: str) -> None:
    assert solve(constraints).describe() == [text]


@pytest.mark.parametrize(
    ("lines", "text"),
    [
        (["H >= 32", "W >= 32"], "any H, W >= 32"),
        (["H >= 4", "W >= 8"], "any H >= 4, W >= 8"),
        (["H >= 4"], "any H >= 4"),
        ([], "any size"),
        (["H % 32 == 0", "W >= 32"], "H % 32 == 0; W >= 32"),
    ],
)
def test_sizes_text(lines: list[str], text: str) -> None:
    assert sizes_text(lines) == text


def test_describe_residues_runs() -> None:
    size = solve([Constraint.ge(H // 16, 1), Constraint.divisible(H // 16, 2)])["H"]
    assert (size.period, size.minimum) == (32, 32)
    assert size.describe("H") == "H in {32k..32k+15}, H >= 32"


def test_inexact_set_still_answers_exactly() -> None:
    size = solve([Constraint.ge(H // 16, 100_000)])["H"]
    assert not size.exact and size.is_empty
    assert size.contains(1_600_000) and not size.contains(1_599_999)
    assert list(size.values()) == []
    assert size.nearest(5) == (None, None)


def test_unconstrained_and_coupled() -> None:
    acc = solve([Constraint.eq(H, W), Constraint.ge(H // 16, 1), Constraint.ge(Expr.const(3), 1)])
    assert acc.symbols == ("H", "W")
    assert acc["W"].unconstrained and acc["W"].minimum == 1
    assert acc.coupled == (Constraint.eq(H, W),)
    assert acc.describe() == ["H >= 16", "H == W"]
    assert acc.contains({"H": 16, "W": 16})
    assert not acc.contains({"H": 16, "W": 17})
    assert not acc.contains({"H": 15, "W": 15})
    assert acc.examples() == [(16, 16), (17, 17), (18, 18)]
    with pytest.raises(ValueError, match="'W'"):
        acc.contains({"H": 16})
    assert solve([]).describe() == []


def test_false_constant_constraint_rejects_everything() -> None:
    acc = solve([Constraint.ge(Expr.const(3), 4)])
    assert acc.describe() == ["3 >= 4"]
    assert not acc.contains({"H": 224, "W": 224})
    assert acc.examples() == []


def test_examples() -> None:
    assert solve([Constraint.ge(H // 32, 7), Constraint.divisible(H, 32)]).examples() == [
        (224, 224),
        (256, 256),
        (288, 288),
    ]
    assert solve([Constraint.eq(H // 16, 14), Constraint.ge(W // 4, 3)]).examples(2) == [(224, 224), (225, 225)]
    assert solve([Constraint.eq(H, 2 * W)]).examples() == [(2, 1), (4, 2), (6, 3)]
    assert solve([Constraint.ge(H, 300)], symbols=("H",)).examples(1) == [(300,)]
    assert solve([Constraint.eq(H, 0)]).examples() == []


def test_extra_symbols_are_solved_too() -> None:
    acc = solve([Constraint.ge(Expr.sym("T") // 2, 3)])
    assert acc.symbols == ("H", "W", "T")
    assert acc.describe() == ["T >= 6"]


def test_nearest() -> None:
    size = solve([Constraint.ge(H // 32, 7), Constraint.divisible(H, 32)])["H"]
    assert size.nearest(240) == (224, 256)
    assert size.nearest(256) == (256, 256)
    assert size.nearest(100) == (None, 224)
    finite = solve([Constraint.eq(H // 16, 14)])["H"]
    assert finite.nearest(300) == (239, None)
    assert finite.maximum == 239


# Constraints of the kind shape inference produces: sizes after conv/pool chains, required positive, equal to a
# value, divisible by a window; and, to exercise the solver, a few oddities (negative slopes, differences).
_single = expressions(symbols=("H",)).map(lambda pair: pair[0])
_constraints = st.one_of(
    st.builds(Constraint.ge, _single, st.integers(-3, 40)),
    st.builds(Constraint.eq, _single, st.integers(-3, 60)),
    st.builds(Constraint.divisible, _single, st.integers(1, 8)),
)


@settings(max_examples=120, deadline=None)
@given(st.lists(_constraints, min_size=1, max_size=3))
def test_solve_matches_brute_force(constraints: list[Constraint]) -> None:
    acc = solve(constraints, symbols=("H",))
    size = acc["H"]
    accepted = [v for v in range(1, 2001) if all(c.holds({"H": v}) for c in constraints)]
    assert [v for v in range(1, 2001) if acc.contains({"H": v})] == accepted, [str(c) for c in constraints]
    if acc.coupled:  # a constant constraint that is false
        assert not accepted
        return
    if accepted:
        assert size.minimum == accepted[0]
    if size.exact:
        head = [v for v in accepted if v <= 300]
        assert _take_until(size.values(), 300) == head
        assert size.describe("H")
        for v in (1, 57, 150, 299):
            down, up = size.nearest(v)
            assert down == max((a for a in accepted if a <= v), default=None)
            if up is not None and up <= 2000:
                assert up == min(a for a in accepted if a >= v)


def _take_until(values: Iterable[int], limit: int) -> list[int]:
    out = []
    for v in values:
        if v > limit:
            break
        out.append(v)
    return out


@settings(max_examples=100, deadline=None)
@given(st.lists(st.builds(Constraint.ge, _single, st.integers(-3, 40)), min_size=1, max_size=2))
def test_conv_constraints_solve_exactly(constraints: list[Constraint]) -> None:
    size = solve(constraints, symbols=("H",))["H"]
    assert size.exact
    assert isinstance(size, SizeSet)


# --------------------------------------------------------------------------------------------------------------------
# TensorType
# --------------------------------------------------------------------------------------------------------------------


def test_tensor_type_image() -> None:
    t = TensorType.image(64, conv(conv(H, 7, 2, 3), 3, 2, 1), conv(conv(W, 7, 2, 3), 3, 2, 1))
    assert str(t) == "image[64, (H + 3)//4, (W + 3)//4]"
    assert t.symbolic_shape() == "[B, 64, (H + 3)//4, (W + 3)//4]"
    assert t.shape({"H": 224, "W": 160}) == ("B", 64, 56, 40)
    assert t.shape({"H": 224, "W": 160}, batch=2) == (2, 64, 56, 40)
    assert t.stride() == 4
    assert t.symbols == {"H", "W"}
    s = TensorType.image(64, H // 4, W // 4)
    assert str(s) == "image[64, H//4, W//4]"
    assert s.symbolic_shape() == "[B, 64, H//4, W//4]"


def test_tensor_type_tokens() -> None:
    t = TensorType.tokens(64, H // 4, W // 4, extra=1)
    assert str(t) == "tokens[1 + (H//4)*(W//4), 64]"
    assert t.symbolic_shape() == "[B, 1 + (H//4)*(W//4), 64]"
    assert t.shape({"H": 224, "W": 224}) == ("B", 1 + 56 * 56, 64)
    assert str(TensorType.tokens(384, 14, 14)) == "tokens[14*14, 384]"
    assert str(TensorType.tokens(8, H, W)) == "tokens[H*W, 8]"
    assert str(TensorType.tokens(8, H + 1, 7)) == "tokens[(H + 1)*7, 8]"
    assert t.stride() == 4


def test_tensor_type_vector_and_with() -> None:
    v = TensorType.vector(1000)
    assert str(v) == "vector[1000]"
    assert v.symbolic_shape() == "[B, 1000]"
    assert v.shape({}, batch=8) == (8, 1000)
    assert v.stride() is None
    t = TensorType.image(3, H, W)
    assert t.with_(channels=64) == TensorType.image(64, H, W)
    assert TensorType("image", 3, (224, 224)).grid == (Expr.const(224), Expr.const(224))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("grid", "stride"),
    [
        ((H, W), 1),
        ((H // 32, W // 32), 32),
        ((conv(H, 3, 2, 1), conv(W, 3, 2, 1)), 2),
        ((H // 16, W // 8), None),
        ((2 * H, 2 * W), None),
        ((Expr.const(7), Expr.const(7)), None),
        ((W // 4, H // 4), None),
        ((H // 4 + W // 4, W // 4), None),
    ],
)
def test_stride(grid: tuple[Expr, Expr], stride: int | None) -> None:
    assert TensorType.image(8, *grid).stride() == stride
