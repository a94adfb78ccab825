"""Where things are in spec text: tests compute expected positions from the text they wrote, never by hand."""

from __future__ import annotations

from blockgraph.errors import Pos


def at(text: str, marker: str, skip: int = 0) -> tuple[int, int]:
    """(line, column), 1-based, of the first character of ``marker`` (which must occur once) plus ``skip``."""
    assert text.count(marker) == 1, f"marker {marker!r} must occur exactly once"
    index = text.index(marker) + skip
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def first_at(text: str, marker: str, skip: int = 0) -> tuple[int, int]:
    """Like :func:`at`, for the first of several occurrences."""
    index = text.index(marker) + skip
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def where(pos: Pos | None) -> tuple[int, int]:
    """(line, column) of a position."""
    assert pos is not None
    return pos.line, pos.column
