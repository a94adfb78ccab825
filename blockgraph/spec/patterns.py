"""Regular expressions that cannot backtrack for long: the key-rename rules of a spec's ``twin``.

A rename rule is searched in every key of a state_dict, by Python's backtracking ``re``; a spec could make that
take minutes on one long key (``^(a+)+$`` on ``aaa...ab``). A rule's pattern is therefore accepted only when the
next character always decides what the pattern does: at a repetition (``*``, ``+``, ``?``, ``{m,n}``), whether
it goes on or stops; at an alternation (``a|b``), which way it takes. Every choice the matcher makes is then undone
at once if it was wrong, and matching at one place costs time proportional to the key's length. Backreferences,
lookarounds and conditionals are refused. Every reference spec's rules are of this kind (``^stages\\.(\\d)\\.``:
``\\d+`` stops at the ``.`` that follows it); ``^(.*)\\.weight$`` is not (``.`` also matches the ``.``), and an
unanchored ``\\.weight$`` says the same thing.

The analysis runs on the parse tree of ``re._parser`` (CPython's own): for each part of a pattern, the characters
it can start with (its FIRST set) and whether it can match nothing, and for each choice the characters that can
follow it (FOLLOW), as an LL(1) grammar check does. Character sets are over-approximated (the ASCII characters
exactly, all others as one), so a doubt is a refusal, never an accepted slow pattern. Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from re import _constants as sre  # type: ignore[attr-defined]  (CPython's regex parser: stable since 3.11)
from re import _parser  # type: ignore[attr-defined]
from typing import Any

__all__ = ["UnsafePatternError", "check", "compile"]

_ASCII = (1 << 128) - 1
_LETTERS = sum(1 << c for c in range(128) if chr(c).isalpha())
_END = 1 << 128
"""The end of the text (``$``, ``\\Z``), a character of its own."""


class UnsafePatternError(ValueError):
    """A pattern that could take a long time to match, or one blockgraph does not accept (with why)."""


_DIGIT, _SPACE, _LETTER, _REST = "digit", "space", "letter", "rest"
_ANY_OTHER = frozenset({_DIGIT, _SPACE, _LETTER, _REST})
r"""The non-ASCII characters in four disjoint parts: ``\d``, ``\s``, ``\w`` but not ``\d``, and the rest."""


@dataclass(frozen=True)
class _Chars:
    """A set of characters: the ASCII ones (and the end of the text) exactly, as bits; the others by the parts
    of :data:`_ANY_OTHER` they meet."""

    mask: int = 0
    other: frozenset[str] = frozenset()

    def __or__(self, more: _Chars) -> _Chars:
        return _Chars(self.mask | more.mask, self.other | more.other)

    def meets(self, more: _Chars) -> bool:
        return bool(self.mask & more.mask) or bool(self.other & more.other)

    def example(self, more: _Chars) -> str:
        """A character both sets hold, as a message shows it."""
        common = self.mask & more.mask
        if common & _END:
            return "the end of the key"
        if common:
            return repr(chr((common & -common).bit_length() - 1))
        return f"a non-ASCII {sorted(self.other & more.other)[0]}"


_NOTHING = _Chars()
_CATEGORIES = {  # each class: as re writes it, and the parts of the non-ASCII characters it holds
    sre.CATEGORY_DIGIT: (r"\d", {_DIGIT}),
    sre.CATEGORY_NOT_DIGIT: (r"\D", {_SPACE, _LETTER, _REST}),
    sre.CATEGORY_SPACE: (r"\s", {_SPACE}),
    sre.CATEGORY_NOT_SPACE: (r"\S", {_DIGIT, _LETTER, _REST}),
    sre.CATEGORY_WORD: (r"\w", {_DIGIT, _LETTER}),
    sre.CATEGORY_NOT_WORD: (r"\W", {_SPACE, _REST}),
}


@cache
def _category(category: Any) -> _Chars:
    """The characters of a class (``\\d``, ``\\w``, ...): the ASCII ones found by asking ``re`` itself."""
    if category not in _CATEGORIES:
        raise UnsafePatternError(f"the character class {category} is not supported")
    written, other = _CATEGORIES[category]
    compiled = re.compile(written)
    return _Chars(sum(1 << c for c in range(128) if compiled.fullmatch(chr(c))), frozenset(other))


def _part(char: str) -> str:
    """Which part of :data:`_ANY_OTHER` a non-ASCII character is in."""
    for part, written in ((_DIGIT, r"\d"), (_SPACE, r"\s"), (_LETTER, r"\w")):
        if re.fullmatch(written, char):
            return part
    return _REST


def _cased(mask: int) -> int:
    """``mask`` with the other case of each ASCII letter in it (IGNORECASE)."""
    for c in range(128):
        if mask >> c & 1 and chr(c).isalpha():
            mask |= 1 << ord(chr(c).swapcase())
    return mask


def _literal(code: int, ignore_case: bool) -> _Chars:
    """One character; under IGNORECASE, with the ASCII ones it folds to, and, for an ASCII letter, the non-ASCII
    letters that may fold to it (the Kelvin sign to k)."""
    char = chr(code)
    if code >= 128:
        folds = sum(1 << c for c in range(128) if re.fullmatch(re.escape(char), chr(c), re.IGNORECASE))
        return _Chars(folds if ignore_case else 0, frozenset({_part(char)}))
    if ignore_case and char.isalpha():
        return _Chars(_cased(1 << code), frozenset({_LETTER}))
    return _Chars(1 << code)


def _set(items: list[tuple[Any, Any]], ignore_case: bool) -> tuple[_Chars, frozenset[str]]:
    """The characters a set's items (``[...]`` without ``^``) name: ASCII exactly, others over-approximated; and
    the parts of the non-ASCII characters it holds whole (those of its classes)."""
    chars, whole = _NOTHING, frozenset[str]()
    for op, av in items:
        if op is sre.LITERAL:
            chars |= _literal(av, ignore_case)
        elif op is sre.RANGE:
            low, high = av
            beyond = high >= 128  # (under IGNORECASE, non-ASCII letters may fold to ASCII ones, and back)
            named = sum(1 << c for c in range(low, min(high, 127) + 1)) | (_LETTERS if beyond and ignore_case else 0)
            chars |= _Chars(named, _ANY_OTHER if beyond or ignore_case else frozenset())
        elif op is sre.CATEGORY:
            chars |= _category(av)
            whole |= _category(av).other
        else:
            raise UnsafePatternError(f"the set item {op} is not supported")
    return _Chars(_cased(chars.mask) if ignore_case else chars.mask, chars.other), whole


def _chars(op: Any, av: Any, flags: int) -> _Chars:
    """The characters one character-matching item can match."""
    ignore_case = bool(flags & sre.SRE_FLAG_IGNORECASE)
    if op is sre.LITERAL:
        return _literal(av, ignore_case)
    if op is sre.NOT_LITERAL:
        excluded = _literal(av, ignore_case).mask if av < 128 else 0
        return _Chars(_ASCII & ~excluded, _ANY_OTHER)
    if op is sre.ANY:
        return _Chars(_ASCII if flags & sre.SRE_FLAG_DOTALL else _ASCII & ~(1 << 10), _ANY_OTHER)
    if av and av[0][0] is sre.NEGATE:  # the complement: what the items name exactly is left out
        named, whole = _set(av[1:], ignore_case)
        return _Chars(_ASCII & ~named.mask, _ANY_OTHER - whole)
    return _set(av, ignore_case)[0]


_REFUSED = {
    sre.GROUPREF: "a backreference (\\1, (?P=name))",
    sre.GROUPREF_EXISTS: "a conditional group ((?(1)...))",
    sre.ASSERT: "a lookahead or lookbehind ((?=...), (?<=...))",
    sre.ASSERT_NOT: "a negative lookahead or lookbehind ((?!...), (?<!...))",
}
_REPEATS = {sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", sre.MAX_REPEAT)}
_CHARACTERS = {sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN}


class _Checker:
    """FIRST sets and the check of every choice, over ``re._parser``'s items (``(op, argument)`` pairs)."""

    def first(self, items: Any, flags: int) -> tuple[_Chars, bool]:
        """What a sequence of items can start with, and whether it can match nothing."""
        chars = _NOTHING
        for op, av in items:
            more, empty = self.item_first(op, av, flags)
            chars |= more
            if not empty:
                return chars, False
        return chars, True

    def item_first(self, op: Any, av: Any, flags: int) -> tuple[_Chars, bool]:
        if op in _CHARACTERS:
            return _chars(op, av, flags), False
        if op is sre.AT:
            ends = av in (sre.AT_END, sre.AT_END_STRING)
            return (_Chars(_END), False) if ends else (_NOTHING, True)
        if op is sre.SUBPATTERN:
            _, add, remove, items = av
            return self.first(items, (flags | add) & ~remove)
        if op is getattr(sre, "ATOMIC_GROUP", None):
            return self.first(av, flags)
        if op is sre.BRANCH:
            chars, empty = _NOTHING, False
            for alternative in av[1]:
                more, more_empty = self.first(alternative, flags)
                chars, empty = chars | more, empty or more_empty
            return chars, empty
        if op in _REPEATS:
            low, _, items = av
            chars, empty = self.first(items, flags)
            return chars, empty or low == 0
        raise UnsafePatternError(f"it uses {_REFUSED.get(op, op)}, which rename rules do not accept")

    def check(self, items: Any, follow: _Chars, flags: int) -> None:
        """Check every choice inside ``items``, which ``follow`` can come after."""
        after = follow
        for op, av in reversed(list(items)):
            self.check_item(op, av, after, flags)
            chars, empty = self.item_first(op, av, flags)
            after = chars | after if empty else chars

    def check_item(self, op: Any, av: Any, after: _Chars, flags: int) -> None:
        if op is sre.SUBPATTERN:
            _, add, remove, items = av
            self.check(items, after, (flags | add) & ~remove)
        elif op is getattr(sre, "ATOMIC_GROUP", None):
            self.check(av, after, flags)
        elif op is sre.BRANCH:
            starts = []
            for alternative in av[1]:
                self.check(alternative, after, flags)
                chars, empty = self.first(alternative, flags)
                starts.append(chars | after if empty else chars)
            for i, one in enumerate(starts):
                for other in starts[i + 1 :]:
                    if one.meets(other):
                        raise UnsafePatternError(
                            f"two alternatives (`|`) can both start with {one.example(other)}, so the next character "
                            "does not decide which one matches"
                        )
        elif op in _REPEATS:
            low, high, items = av
            chars, empty = self.first(items, flags)
            if empty and high > 1:
                raise UnsafePatternError("it repeats a part that can match nothing")
            self.check(items, chars | after if high > 1 else after, flags)
            if low < high and chars.meets(after):
                raise UnsafePatternError(
                    f"a repetition (`*`, `+`, `?`, `{{m,n}}`) can either go on or stop at {chars.example(after)}, so "
                    "matching may try every way to split a key between repetitions (write `[^.]*` or `\\d+` where a "
                    "`.` follows; a pattern is searched anywhere in a key, so `^(.*)` can be left out)"
                )


def check(pattern: str) -> None:
    """Accept ``pattern`` only if it is a regular expression that matches in time proportional to the text.

    Raises:
        UnsafePatternError: it is not a valid regular expression, or it may backtrack (the message says where and why).
    """
    try:
        parsed = _parser.parse(pattern)
    except re.error as e:
        raise UnsafePatternError(f"it is not a valid regular expression: {e}") from None
    _Checker().check(parsed, _NOTHING, parsed.state.flags)


def compile(pattern: str) -> re.Pattern[str]:  # noqa: A001 - the module's verb, as re.compile
    """``re.compile(pattern)`` after :func:`check`."""
    check(pattern)
    return re.compile(pattern)
