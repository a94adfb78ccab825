"""einops patterns as ops: ``rearrange``, ``reduce`` and ``repeat`` (Rogozhnikov, "Einops: Clear and Reliable Tensor
Manipulations with Einstein-like Notation", ICLR 2022), checked statically.

A pattern's left side is bound to the input's dims (image ``b c h w``, tokens ``b n c``, vector ``b c``): each group
of axes (a lone axis, or a parenthesized composition) equals its dim, so each axis gets a size, symbolic in the input
size. What a split needs of the input (``b c (h p) w`` with ``p: 4``: the map's height divisible by 4) becomes a
constraint, so ``validate`` says for which input sizes a pattern fits, and which axis does not divide otherwise. The
right side must again be a layout blockgraph carries: an image, tokens (whose grid is its composition of two axes)
or a vector.

The pattern is parsed by einops' own parser (``einops.parsing``, which imports no torch), so a pattern that
validates here is one einops accepts. The module is einops' own layer (``Rearrange``, ``Reduce``, subclassed
only so that torch.fx records it as one call; ``repeat`` is
``Reduce(..., "repeat")``, as ``einops.repeat`` is); when a length the pattern needs at run time is the token grid
(``b (h w) c -> b c h w`` on tokens), the block :meth:`~EinopsSpec.takes_size` and its module passes the grid to
``einops.reduce``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt

from blockgraph.blocks.base import BuildContext
from blockgraph.errors import SpecError
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import Constraint, Expr, TensorType

AxisName = Annotated[str, Field(pattern=r"^[A-Za-z]([A-Za-z0-9_]*[A-Za-z0-9])?$", max_length=64)]
"""An einops axis name: an identifier that neither starts nor ends with ``_``."""

LAYOUTS = "image [B, C, h, w] (`b c h w`), tokens [B, N, C] (`b n c`, `b (h w) c`) or vector [B, C] (`b c`)"
"""The layouts a pattern's sides can bind, for messages."""


class EinopsSpec(BlockSpec):
    """The fields and shape rule of the einops ops (not an op itself)."""

    pattern: str
    """The einops pattern, ``left -> right`` (``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``). The first axis is the
    batch and stays first; the left side names the input's dims: image `b c h w`, tokens `b n c` (`b (h w) c` binds
    the token grid), vector `b c`."""
    axes: dict[AxisName, PositiveInt] = {}
    """Constant axis lengths, einops' ``**axes_lengths`` (``{p1: 4, p2: 4}``)."""

    def operation(self) -> str:
        """What einops calls the operation: ``rearrange``, ``repeat``, or the reduction (``mean``, ...)."""
        return self.op

    def plan(self, x: TensorType) -> Plan:
        """The pattern bound to the input type ``x``: the output type, the constraints on the input size, and the
        lengths the module needs.

        Raises:
            PatternError: the pattern is malformed, or does not fit ``x``.
        """
        return _plan(self.op, self.pattern, self.operation(), self.axes, x)

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout=("image", "tokens", "vector"))
        try:
            plan = self.plan(x)
        except PatternError as e:
            if e.spec:  # wrong whatever the input: the pattern itself
                raise SpecError(e.message, pos=ctx.pos("pattern"), node=ctx.node.name, hint=e.hint) from None
            ctx.fail(e.message, field="pattern", hint=e.hint)
        for constraint, message, hint in plan.requirements:
            ctx.require(constraint, message, field="pattern", hint=hint)
        return plan.output

    def takes_size(self, *inputs: TensorType) -> bool:
        return bool(self.plan(*inputs).grid_axes)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        plan = self.plan(x)
        if plan.grid_axes:
            from blockgraph.layers.einops import EinopsOnGrid

            return EinopsOnGrid(self.pattern, self.operation(), plan.lengths, plan.grid_axes)
        if self.op == "rearrange":
            from blockgraph.layers.einops import Rearrange

            return Rearrange(self.pattern, **plan.lengths)
        from blockgraph.layers.einops import Reduce

        return Reduce(self.pattern, self.operation(), **plan.lengths)

    def params(self, x: TensorType) -> int:
        return 0


@register
class RearrangeSpec(EinopsSpec):
    """Reorder, split and merge axes: ``einops.rearrange``. Every axis of the left side appears on the right:
    ``b (h w) c -> b c h w``, or patches ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``."""

    op: Literal["rearrange"]


@register
class ReduceSpec(EinopsSpec):
    """Reduce the axes the right side leaves out: ``einops.reduce``. Global pooling ``b c h w -> b c``, 2x2
    pooling ``b c (h 2) (w 2) -> b c h w``."""

    op: Literal["reduce"]
    reduction: Literal["mean", "max", "min", "sum", "prod"]
    """How the dropped axes are reduced."""

    def operation(self) -> str:
        return self.reduction


@register
class RepeatSpec(EinopsSpec):
    """Add axes, copying the input along them: ``einops.repeat``. A new axis's length is in ``axes`` or
    written as a number: ``b c h w -> b (c r) h w`` with ``axes: {r: 2}``."""

    op: Literal["repeat"]


# -------------------------------------------------------------------------------------------------------------------
# Binding a pattern to a tensor type
# -------------------------------------------------------------------------------------------------------------------

Group = tuple[str | int, ...]
"""One group of a pattern's side: axis names, and ints for numbered axes (``(h 2)``); ``()`` is a unit axis (a ``1``
or ``()`` in the pattern)."""

SYNTAX = "a pattern is `left -> right`, each side axis names and numbers, one level of parentheses: `b c (h 2) w`"


class PatternError(Exception):
    """A pattern that is malformed (``spec``: wrong whatever the input) or that does not fit its input type; the shape
    rule reports it at the ``pattern`` field."""

    def __init__(self, message: str, hint: str | None = None, *, spec: bool = False):
        super().__init__(message)
        self.message, self.hint, self.spec = message, hint, spec


@dataclass(frozen=True)
class Plan:
    """A pattern bound to an input type."""

    output: TensorType
    requirements: tuple[tuple[Constraint, str, str | None], ...]
    """What the input size must satisfy for the pattern to fit, each with what to say when it does not, and a hint."""
    lengths: dict[str, int]
    """The constant axis lengths the module is built with: ``axes``, and grid lengths that are constants."""
    grid_axes: dict[str, int]
    """The axes whose length ``forward`` reads from the input's grid ``(h, w)``: axis → 0 (h) or 1 (w)."""


@dataclass(frozen=True)
class _Tokens:
    """The token count ``extra + h*w`` of a tokens input, with its grid: what a lone axis on it is bound to."""

    grid: tuple[Expr, Expr]
    extra: int

    def affine(self) -> Expr | None:
        """The count as a size expression, when one grid size is a constant; else None (``h*w`` is no affine
        expression of the input size)."""
        h, w = self.grid
        return self.extra + h * w if h.is_const or w.is_const else None

    def factors(self) -> list[Expr] | None:
        """Sizes whose product is the count (``[h, w]`` without extra tokens), or None."""
        if self.extra == 0:
            return list(self.grid)
        count = self.affine()
        return None if count is None else [count]

    def __str__(self) -> str:
        count = "*".join(_factor(s) for s in self.grid)
        return f"{self.extra} + {count}" if self.extra else count


Length = Expr | _Tokens


def _plan(op: str, pattern: str, operation: str, axes: dict[str, int], x: TensorType) -> Plan:
    left, right = _parse(pattern)
    _check_axes(op, pattern, left, right, axes)
    dims = _dims(x)
    if len(left) - 1 != len(dims):
        raise PatternError(
            f"the pattern's left side `{_side(left)}` has {len(left)} dims, the input {x} has {len(dims) + 1}",
            hint=f"the left side names the input's dims: {LAYOUTS}",
        )
    lengths: dict[str, Length] = {}
    requirements: list[tuple[Constraint, str, str | None]] = []
    constants, grid_axes = dict(axes), dict[str, int]()
    for group, dim in zip(left[1:], dims, strict=True):
        names = [a for a in group if isinstance(a, str)]
        unknown = [a for a in names if a not in axes]
        text = _group(group)
        if isinstance(dim, _Tokens):
            if len(group) == 1 and unknown:  # the whole token count: grid and extra tokens travel with it
                lengths[unknown[0]] = dim
                continue
            if len(names) == len(group) == 2 and (len(unknown) == 2 or dim.affine() is None):
                requirements += _bind_grid((names[0], names[1]), dim, axes, lengths, constants, grid_axes)
                continue
            count = dim.affine()
            if count is None:
                raise PatternError(
                    f"{text} cannot split the token count {dim} of the input {x}",
                    hint=f"the tokens carry {dim.extra} extra token(s) (cls): keep the token axis whole (`b n c`)"
                    if dim.extra
                    else "write the token axis as one axis (`b n c`) or as the token grid `(h w)` (rows, columns)",
                )
            dim = count
        known = 1
        for a in group:
            known *= a if isinstance(a, int) else axes.get(a, 1)
        hint: str | None = None
        if not unknown:
            message = f"the input's dim {dim} must be {known}" + (
                f", the length of {text}" if text != str(known) else ""
            )
            if dim.is_const:
                hint = f"make the lengths of {text} multiply to {dim}"
            requirements.append((Constraint.eq(dim, known), message, hint))
        elif len(unknown) == 1:
            lengths[unknown[0]] = dim // known
            if known > 1:
                message = f"axis '{unknown[0]}' of {text}: {dim} is not divisible by {_known(group, axes)}"
                if dim.is_const:
                    hint = f"the other lengths of {text} must multiply to a divisor of {dim}"
                requirements.append((Constraint.divisible(dim, known), message, hint))
        else:
            given = ", ".join(f"{a}: ..." for a in unknown[1:])
            raise PatternError(
                f"{text} has {len(unknown)} axes of unknown length ({', '.join(map(repr, unknown))}): only one of "
                f"a group can be inferred from its size {dim}",
                hint=f"give the lengths of all but one in `axes:` ({{{given}}})",
            )
    for a, v in axes.items():
        lengths.setdefault(a, Expr.const(v))
    output = _output(right[1:], lengths)
    return Plan(output, tuple(requirements), constants, grid_axes)


def _bind_grid(
    group: tuple[str, str],
    dim: _Tokens,
    axes: dict[str, int],
    lengths: dict[str, Length],
    constants: dict[str, int],
    grid_axes: dict[str, int],
) -> list[tuple[Constraint, str, str | None]]:
    """Bind ``(h w)`` on a token count to the tokens' grid (rows, then columns); a length given in ``axes`` must be
    the grid's. With neither given, einops needs one at run time: a constant one is a length of the module, else
    ``forward`` reads it from the grid (``grid_axes``)."""
    text = _group(group)
    if dim.extra:
        raise PatternError(
            f"{text} binds the token grid, but the tokens carry {dim.extra} extra token(s) (cls) before it",
            hint="remove_cls_token first, or keep the token axis whole (`b n c`)",
        )
    requirements: list[tuple[Constraint, str, str | None]] = []
    for axis, size, what in zip(group, dim.grid, ("height", "width"), strict=True):
        if axis in axes:
            message = f"axis '{axis}' of {text} is the token grid's {what} {size}, but `axes` gives {axis}={axes[axis]}"
            requirements.append((Constraint.eq(size, axes[axis]), message, None))
        else:
            lengths[axis] = size
    if not requirements:  # einops infers one of the two from the count, given the other
        if dim.grid[0].is_const or dim.grid[1].is_const:
            i = 0 if dim.grid[0].is_const else 1
            constants[group[i]] = dim.grid[i].constant
        else:
            grid_axes[group[0]] = 0
    return requirements


def _output(groups: list[Group], lengths: dict[str, Length]) -> TensorType:
    """The type of the right side's dims (after the batch): an image, tokens or a vector."""
    sizes = [[Expr.const(a) if isinstance(a, int) else lengths[a] for a in g] for g in groups]
    shown = f"[B, {', '.join(_size(s) for s in sizes)}]"
    if len(groups) not in (1, 2, 3):
        raise PatternError(
            f"the output would have {len(groups) + 1} dims, {shown}: blockgraph carries {LAYOUTS}",
            hint="merge axes with parentheses (`(p1 p2 c)`), or drop them with `op: reduce`",
        )
    which = sizes[0] if len(groups) == 3 else sizes[-1]  # image: [B, C, h, w]; tokens and vector: C last
    channels = _product(which)
    if channels is None or not channels.is_const:
        raise PatternError(
            f"the output's channels would be {_size(which)}: they depend on the input size ({shown})",
            hint="a channel count is a constant: keep axes of input-dependent length out of the channel dim",
        )
    if len(groups) == 1:
        return TensorType.vector(channels.constant)
    if len(groups) == 3:
        h, w = _product(sizes[1]), _product(sizes[2])
        for size, factors, what in ((h, sizes[1], "height"), (w, sizes[2], "width")):
            if size is None:
                raise PatternError(
                    f"the output map's {what} would be {_size(factors)} ({shown}): a product of input-dependent "
                    "sizes, which blockgraph cannot carry",
                    hint="a map's size is one input-dependent size times constants (`(h 2)`, not `(h w)`)",
                )
        assert h is not None and w is not None
        return TensorType.image(channels.constant, h, w)
    count = sizes[0]
    if len(count) == 1 and isinstance(count[0], _Tokens):  # the token count passes whole: grid and extra tokens too
        return TensorType.tokens(channels.constant, *count[0].grid, extra=count[0].extra)
    tokens_grid = _grid(count)
    if tokens_grid is None:
        raise PatternError(
            f"the output's token count would be {_size(count)} ({shown}): no grid (rows, columns) of sizes blockgraph "
            "can carry",
            hint="write the token dim as the composition of two axes, rows then columns: `(h w)`",
        )
    return TensorType.tokens(channels.constant, *tokens_grid)


def _grid(sizes: list[Length]) -> tuple[Expr, Expr] | None:
    """A row-major grid ``(rows, columns)`` of the composition of ``sizes``: a split of its factors into a prefix and
    a suffix whose products are both size expressions (``(h w)`` → ``(h, w)``; ``(n)`` → ``(n, 1)``)."""
    factors = _factors(sizes)
    if factors is None:
        return None
    for split in [*range(1, len(factors)), len(factors)]:
        rows, columns = _affine(factors[:split]), _affine(factors[split:])
        if rows is not None and columns is not None:
            return rows, columns
    return None


def _factors(sizes: list[Length]) -> list[Expr] | None:
    out: list[Expr] = []
    for s in sizes:
        f = s.factors() if isinstance(s, _Tokens) else [s]
        if f is None:
            return None
        out += f
    return out


def _affine(factors: list[Expr]) -> Expr | None:
    """The product of ``factors`` if at most one is input-dependent (an affine size), else None."""
    constant, symbolic = 1, []
    for f in factors:
        if f.is_const:
            constant *= f.constant
        else:
            symbolic.append(f)
    if len(symbolic) > 1:
        return None
    return symbolic[0] * constant if symbolic else Expr.const(constant)


def _product(sizes: list[Length]) -> Expr | None:
    factors = _factors(sizes)
    return None if factors is None else _affine(factors)


# -- parsing and rules that hold whatever the input ------------------------------------------------------------------


def _parse(pattern: str) -> tuple[list[Group], list[Group]]:
    """The pattern's two sides as groups, parsed by einops' own parser (which imports no torch)."""
    from einops import EinopsError
    from einops.parsing import AnonymousAxis, ParsedExpression

    sides = pattern.split("->")
    if len(sides) != 2:
        raise PatternError(f"the pattern {pattern!r} needs one `->` between its sides", hint=SYNTAX, spec=True)
    out = []
    for side in sides:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # einops warns of names it will refuse (`axis`, keywords)
                parsed = ParsedExpression(side)
        except (EinopsError, Warning) as e:
            message = " ".join(str(e).split())
            raise PatternError(f"bad pattern {pattern!r}: {message}", hint=SYNTAX, spec=True) from None
        if parsed.has_ellipsis:
            raise PatternError(
                f"the pattern {pattern!r} has an ellipsis (`...`), which blockgraph does not bind",
                hint=f"name every dim: {LAYOUTS}",
                spec=True,
            )
        groups = [tuple(a.value if isinstance(a, AnonymousAxis) else a for a in g) for g in parsed.composition]
        out.append(groups)
    return out[0], out[1]


def _check_axes(op: str, pattern: str, left: list[Group], right: list[Group], axes: dict[str, int]) -> None:
    """Check the rules of einops' operation, and that the batch axis is first and alone on both sides."""
    names = {side: [a for g in groups for a in g if isinstance(a, str)] for side, groups in (("l", left), ("r", right))}
    numbers = {
        side: [a for g in groups for a in g if isinstance(a, int)] for side, groups in (("l", left), ("r", right))
    }
    only_left = [a for a in names["l"] if a not in names["r"]]
    only_right = [a for a in names["r"] if a not in names["l"]]

    def fail(message: str, hint: str) -> PatternError:
        return PatternError(f"{message} (pattern {pattern!r})", hint=hint, spec=True)

    if op == "rearrange" and (numbers["l"] or numbers["r"]):
        raise fail(
            f"rearrange takes no numbered axes but 1 (found {(numbers['l'] + numbers['r'])[0]})",
            "name the axis and give its length in `axes:` (`(h p)` with `axes: {p: 2}`); reduce and repeat take numbers",
        )
    if op == "repeat" and numbers["l"]:
        raise fail(
            f"repeat takes numbered axes on its right side only (found {numbers['l'][0]} on the left)",
            "name the axis, with its length in `axes:`",
        )
    if op != "repeat" and op != "rearrange" and numbers["r"]:
        raise fail(
            f"reduce takes numbered axes on its left side only (found {numbers['r'][0]} on the right)",
            "write the split on the left: `b c (h 2) w -> b c h w`",
        )
    if only_right and op != "repeat":
        raise fail(
            f"axis {_names(only_right)} of the right side is not on the left: {op} cannot make new axes",
            "use `op: repeat` to add an axis; check the spelling of the axis names",
        )
    if only_left and op != "reduce":
        raise fail(
            f"axis {_names(only_left)} of the left side is missing on the right: {op} keeps every axis",
            "use `op: reduce` to drop an axis; check the spelling of the axis names",
        )
    if op == "repeat" and (new := [a for a in only_right if a not in axes]):
        raise fail(f"new axis {_names(new)} has no length", f"give it in `axes:` ({{{new[0]}: 2}}), or write a number")
    if unused := [a for a in axes if a not in names["l"] and a not in names["r"]]:
        raise fail(
            f"axis {_names(unused)} of `axes:` is not in the pattern",
            "remove it from `axes:`, or use it in the pattern",
        )
    if not (left and len(left[0]) == 1 and isinstance(left[0][0], str) and right and right[0] == left[0]):
        b = left[0][0] if left and len(left[0]) == 1 and isinstance(left[0][0], str) else "b"
        raise fail(
            "the first axis is the batch: it stays the first dim of both sides, alone",
            f"write `{b} ... -> {b} ...`: blockgraph's layouts all put the batch first",
        )
    if (batch := left[0][0]) in axes:
        raise fail(f"the batch axis '{batch}' takes any length", f"remove '{batch}' from `axes:`")


def _dims(x: TensorType) -> list[Length]:
    """The input's dims after the batch: image ``C, h, w``, tokens ``extra + h*w, C``, vector ``C``."""
    c = Expr.const(x.channels)
    if x.layout == "image":
        assert x.grid is not None
        return [c, *x.grid]
    if x.layout == "tokens":
        assert x.grid is not None
        return [_Tokens(x.grid, x.extra), c]
    return [c]


# -- text ------------------------------------------------------------------------------------------------------------


def _group(group: Group) -> str:
    return f"({' '.join(map(str, group))})" if len(group) != 1 else str(group[0])


def _side(groups: list[Group]) -> str:
    return " ".join(map(_group, groups))


def _names(axes: list[str]) -> str:
    return ", ".join(f"'{a}'" for a in axes)


def _known(group: Group, axes: dict[str, int]) -> str:
    """The known lengths of a group as text: ``p1=2``, ``2``, ``p1*p2=8``."""
    parts = [a for a in group if isinstance(a, int) or a in axes]
    total = 1
    for a in parts:
        total *= a if isinstance(a, int) else axes[a]
    if len(parts) == 1:
        a = parts[0]
        return str(a) if isinstance(a, int) else f"{a}={axes[a]}"
    return f"{'*'.join(map(str, parts))}={total}"


def _factor(e: Expr) -> str:
    text = str(e)
    return text if e.is_const or text.isidentifier() else f"({text})"


def _size(sizes: list[Length]) -> str:
    """The product of ``sizes`` as text."""
    product = _product(sizes)
    if product is not None:
        return str(product)
    return "*".join(
        str(s) if isinstance(s, _Tokens) and not s.extra else _factor(s) if isinstance(s, Expr) else f"({s})"
        for s in sizes
    )
