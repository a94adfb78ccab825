"""Error types of blockgraph.

Every error that crosses the public API is a :class:`BlockgraphError`. Each one says *where* (file, line, column,
node), *what* went wrong, and *how to fix it* (``hint``). This module imports nothing of ours, so every layer can
raise these errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Pos:
    """A position in a source file. ``line`` and ``column`` are 1-based; 0 means unknown."""

    file: str = "<spec>"
    line: int = 0
    column: int = 0
    via: Pos | None = None
    """Where the value came from, when it was copied (a variable's definition, a parent spec's line)."""
    via_label: str = ""

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}:{self.column}"
        return self.file

    def shifted(self, columns: int) -> Pos:
        """The same position ``columns`` characters further right (for a place inside a scalar)."""
        return Pos(self.file, self.line, self.column + columns, self.via, self.via_label)

    def through(self, origin: Pos, label: str) -> Pos:
        """This position, remembering that the value was taken from ``origin`` (shown as ``label``)."""
        return Pos(self.file, self.line, self.column, origin, label)

    def with_origin(self, origin: Pos, label: str) -> Pos:
        """This position with one more origin in front of its trail (keeping the ones it had)."""
        first = Pos(origin.file, origin.line, origin.column, self.via, self.via_label)
        return Pos(self.file, self.line, self.column, first, label)

    def trail(self) -> Iterator[tuple[str, Pos]]:
        """The chain of origins: ``(label, pos)`` for each hop behind this position."""
        here: Pos | None = self
        while here is not None and here.via is not None:
            yield here.via_label, here.via
            here = here.via


class BlockgraphError(Exception):
    """Base of every error blockgraph raises on purpose.

    Args:
        message: what is wrong: what was expected, what was found.
        pos: where in the spec (file:line:col); ``None`` when no spec position applies.
        node: the graph node (or spec entry) concerned, if any.
        hint: how to fix it.
        warning: a problem that does not stop the pipeline (reported, exit status unchanged).
    """

    kind = "error"

    def __init__(
        self,
        message: str,
        *,
        pos: Pos | None = None,
        node: str | None = None,
        hint: str | None = None,
        warning: bool = False,
    ):
        super().__init__(message)
        if warning:
            self.kind = "warning"
        self.message = message
        self.pos = pos
        self.node = node
        self.hint = hint

    @property
    def file(self) -> str | None:
        return self.pos.file if self.pos else None

    @property
    def line(self) -> int | None:
        return self.pos.line if self.pos else None

    @property
    def column(self) -> int | None:
        return self.pos.column if self.pos else None

    @property
    def errors(self) -> list[BlockgraphError]:
        """The individual errors (one, unless this is an :class:`MultiError`)."""
        return [self]

    def format(self) -> str:
        """``FILE:LINE:COL: error: MESSAGE`` then ``hint: ...`` and the origins of the value, one per line."""
        where = f"{self.pos}: " if self.pos else ""
        what = f"node '{self.node}': " if self.node and f"'{self.node}'" not in self.message else ""
        lines = [f"{where}{self.kind}: {what}{self.message}"]
        if self.pos:
            lines += [f"  {label} at {origin}" for label, origin in self.pos.trail()]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


class SpecError(BlockgraphError):
    """The spec text or its structure is wrong (YAML, keys, types, variables, extends)."""


class GraphError(BlockgraphError):
    """The dataflow is wrong (unknown reference, duplicate name, cycle, unused output)."""


class ShapeError(BlockgraphError):
    """Static shape inference found an inconsistency or an input size the model cannot take."""


class BudgetError(BlockgraphError):
    """The model would exceed a resource budget (parameters, activation memory)."""


class ExportError(BlockgraphError):
    """The model cannot be exported (the exporter failed, or the output cannot be written)."""


class WeightsError(BlockgraphError):
    """A state_dict or checkpoint does not fit the model."""


class PluginError(BlockgraphError):
    """A module of custom blocks (a spec's ``imports:``, ``--plugin``, an entry point of the ``blockgraph.blocks``
    group) cannot be found, failed to load or to register, or may not be imported (a checkpoint's spec)."""


class BlockError(BlockgraphError):
    """A block broke its own contract: its module's parameters or output shapes differ from its rules, or its
    rules failed (a custom block's code raised)."""


class MultiError(BlockgraphError):
    """Several errors found in one pass (every bad key of a spec, say), reported together."""

    def __init__(self, errors: Iterable[BlockgraphError]):
        self._errors = list(errors)
        if not self._errors:
            raise ValueError("MultiError needs at least one error")
        first = self._errors[0]
        super().__init__(first.message, pos=first.pos, node=first.node, hint=first.hint)

    @property
    def errors(self) -> list[BlockgraphError]:
        return list(self._errors)

    def format(self) -> str:
        return "\n".join(e.format() for e in self._errors)


_GROUPS: dict[type, type] = {}


def raise_all(errors: list[BlockgraphError]) -> None:
    """Raise the one error, or a :class:`MultiError` of several; do nothing for an empty list.

    When every error has the same type (all ``ShapeError``, say), the group is an instance of that type too, so
    ``except ShapeError`` catches it.
    """
    if len(errors) == 1:
        raise errors[0]
    if errors:
        kinds = {type(e) for e in errors}
        group: type = MultiError
        if len(kinds) == 1 and (kind := kinds.pop()) is not BlockgraphError and not issubclass(kind, MultiError):
            group = _GROUPS.setdefault(kind, type(f"Multi{kind.__name__}", (MultiError, kind), {}))
        raise group(errors)
