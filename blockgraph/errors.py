"""Error types of blockgraph.

Every error that crosses the public API is a :class:`BlockgraphError`. Each one says *where* (file, line, column,
node), *what* went wrong, and *how to fix it* (``hint``). This module imports nothing of ours, so every layer can
raise these errors.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any


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


EXCERPT = 40
"""The most characters of a value that a message shows: a value may come from any file a spec names, so messages
never echo it whole."""


def shorten(text: str, limit: int = EXCERPT) -> str:
    """``text`` itself when it is short, else its first characters, ``...`` and its length."""
    if len(text) <= limit:
        return text
    return f"{text[: max(limit - 3, 1)]}... ({len(text):,} characters)"


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """``repr(value)`` for a message, shortened (:func:`shorten`): ``'sk-live-0123...' (58 characters)``."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value):,} characters)" if isinstance(value, str) else ""
    return f"{text[: max(limit - 3, 1)]}...{size}"


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
_QUOTED = re.compile(r"'[^']*'")
_COPY_LABEL = "in repetition "


def merge_copies(errors: Sequence[BlockgraphError]) -> list[BlockgraphError]:
    """The errors with those that differ only by the copy of a repeated block (``depth:``, ``for:``, a block
    defined in the spec and used several times) merged into one naming every copy: same type, same place in the
    spec, same message and hint but for the copies' indices. The first copy's error stands for all, its node named
    ``stage1.blocks.0..7`` (``and`` between groups), its trail without the repetition it came from."""
    groups: dict[tuple[Any, ...], list[BlockgraphError]] = {}
    for error in (e for group in errors for e in group.errors):  # a MultiError among them: its errors
        pos = error.pos
        known = pos is not None and (pos.line or pos.file != Pos.file)  # a line, or a place of its own (`--set`)
        place = (pos.file, pos.line, pos.column) if known else id(error)
        key = (
            type(error),
            error.kind,
            place,
            _indexless(error.message),
            _indexless(error.hint or ""),
        )
        groups.setdefault(key, []).append(error)
    out: list[BlockgraphError] = []
    for copies in groups.values():
        first = copies[0]
        nodes = list(dict.fromkeys(e.node for e in copies if e.node))
        if len(copies) == 1 or len(nodes) < 2:
            out.append(first)
            continue
        named = copy_names(nodes)
        merged = copy.copy(first)
        merged.message = first.message.replace(f"'{first.node}'", f"'{named}'")
        merged.node = named
        merged.pos = _without_repetition(first.pos) if first.pos is not None else None
        merged.args = (merged.message,)
        out.append(merged)
    return out


def _indexless(text: str) -> str:
    """``text`` with the numbers inside quoted names blanked (``'stage1.blocks.3'`` → ``'stage#.blocks.#'``)."""
    return _QUOTED.sub(lambda m: re.sub(r"\d+", "#", m.group()), text)


def copy_names(names: Sequence[str]) -> str:
    """Node names that differ in one index, compressed: ``s1.blocks.0``, ``s1.blocks.1``, ``s2.blocks.0`` →
    ``s1.blocks.0..1 and s2.blocks.0``; names without an index are listed as they are."""
    groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[int]] = {}
    for name in names:
        parts = name.split(".")
        at = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
        key = (tuple(parts[:at]), tuple(parts[at + 1 :])) if at >= 0 else (tuple(parts), ("",))
        groups.setdefault(key, []).append(int(parts[at]) if at >= 0 else -1)
    shown = []
    for (head, tail), indices in groups.items():
        if indices == [-1] * len(indices):
            shown.append(".".join(head))
            continue
        runs = _runs(sorted(set(indices)))
        index = ",".join(f"{a}..{b}" if b > a else str(a) for a, b in runs)
        index = index if len(runs) == 1 else "{" + index + "}"
        shown.append(".".join([*head, index, *tail]))
    return " and ".join(shown)


def _runs(values: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def _without_repetition(pos: Pos) -> Pos:
    """``pos`` with the hops of its trail that name a repetition removed (the merged error stands for them all)."""
    hops = [(label, origin) for label, origin in pos.trail() if not label.startswith(_COPY_LABEL)]
    out = Pos(pos.file, pos.line, pos.column)
    for label, origin in reversed(hops):
        out = Pos(
            out.file, out.line, out.column, Pos(origin.file, origin.line, origin.column, out.via, out.via_label), label
        )
    return out


MAX_REPORTED = 100
"""The most errors one pass reports: a spec with thousands of mistakes is told about the first ones, fast."""


def more_errors(count: int, like: BlockgraphError) -> BlockgraphError:
    """The error that stands for ``count`` errors not reported (after :data:`MAX_REPORTED`), of ``like``'s type."""
    return type(like)(
        f"{count:,} more error(s) not shown (the first {MAX_REPORTED} are)",
        pos=Pos(like.pos.file) if like.pos is not None else None,
        hint="fix these first",
    )


def raise_all(errors: list[BlockgraphError]) -> None:
    """Raise the one error, or a :class:`MultiError` of several; do nothing for an empty list. Errors that differ
    only by the copy of a repeated block are merged first (:func:`merge_copies`); beyond :data:`MAX_REPORTED`,
    one error says how many more there are.

    When every error has the same type (all ``ShapeError``, say), the group is an instance of that type too, so
    ``except ShapeError`` catches it.
    """
    errors = merge_copies(errors)
    if len(errors) > MAX_REPORTED + 1:
        errors = [*errors[:MAX_REPORTED], more_errors(len(errors) - MAX_REPORTED, errors[0])]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        kinds = {type(e) for e in errors}
        group: type = MultiError
        if len(kinds) == 1 and (kind := kinds.pop()) is not BlockgraphError and not issubclass(kind, MultiError):
            group = _GROUPS.setdefault(kind, type(f"Multi{kind.__name__}", (MultiError, kind), {}))
        raise group(errors)
