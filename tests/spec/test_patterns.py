"""Tests of blockgraph.spec.patterns: rename patterns are accepted only when the next character always decides,
and a refused one is a SpecError at its line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from blockgraph.errors import SpecError
from blockgraph.pipeline import analyze
from blockgraph.spec import patterns
from tests.conftest import SPECS
from tests.support.positions import at
from tests.support.processes import run_bounded

REFUSED = [
    (r"^(a+)+$", r"a repetition .* can either go on or stop at 'a'"),
    (r"(a*)*b", "repeats a part that can match nothing"),
    (r"(?:ab|\wc)+$", "two alternatives .* can both start with 'a'"),
    (r"(ab|\d\d|a)", "two alternatives .* can both start with 'a'"),
    (r"a?a?a?a?aaaa", "can either go on or stop at 'a'"),
    (r"^(.*)\.weight$", r"stop at '\.'"),
    (r"\d+\d+x", "stop at '0'"),
    (r"(\w+\.)*\w+$", "stop at '0'"),
    (r"(?i)K+k", "stop at 'K'"),
    (r"(?i)\u212a+k", "stop at 'K'"),  # the Kelvin sign folds to k
    (r"é+\w", "stop at a non-ASCII letter"),
    (r"(a)\1", "backreference"),
    (r"(?P<x>a)(?P=x)", "backreference"),
    (r"a(?=b)", "lookahead"),
    (r"(?<!a)b", "negative lookahead or lookbehind"),
    (r"(a)?(?(1)b|c)", "conditional"),
    (r"^(a+", "not a valid regular expression"),
]
ACCEPTED = [
    r"^stages\.(\d)\.blocks\.(\d+)\.gamma$",
    r"^(?:serial_blocks(\d)\.\d+\.cpe|cpe(\d))\.",
    r"^mhca_stages\.1\.mhca_blks\.(\d+)\.(?:MHCA_layers\.\d+\.(?:factoratt_crpe\.)?)?crpe\.",
    r"(\d+\.)+x",
    r"[^.]+\.",
    r"\.weight$",
    r"\w+\s",
    r"\d*\D",
    r"(?:a|b)+c",
    r"(a|ab)*c",  # (re factors it into a(?:|b): the next character decides)
    r"^.*$",
    r"a{3}a",
]


@pytest.mark.parametrize(("pattern", "reason"), REFUSED, ids=[p for p, _ in REFUSED])
def test_patterns_that_may_backtrack_are_refused(pattern: str, reason: str) -> None:
    with pytest.raises(patterns.UnsafePatternError, match=reason):
        patterns.check(pattern)


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_patterns_where_the_next_character_decides_are_accepted(pattern: str) -> None:
    assert patterns.compile(pattern).pattern == pattern


def test_every_reference_spec_rename_pattern_is_accepted() -> None:
    checked = 0
    for path in SPECS:
        twin = analyze(path).spec.twin
        for pattern, _ in twin.rules() if twin is not None else []:
            patterns.check(pattern)
            checked += 1
    assert checked > 40


FAMILY = "name: t\nextends: coat_lite_tiny\ntwin:\n  timm: coat_lite_tiny\n  rename:\n"


@pytest.mark.parametrize(
    ("rule", "marker"),
    [
        ("    - ['^head\\.', head.fc.]\n    - ['^(a+)+$', x]\n", "'^(a+)+$'"),
        ("    - {from: '(x|x)*', to: y}\n", "'(x|x)*'"),
    ],
    ids=["pair", "mapping"],
)
def test_a_refused_pattern_is_a_spec_error_at_its_line(tmp_path: Path, rule: str, marker: str) -> None:
    text = FAMILY + rule
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=f"rename pattern {re.escape(marker)} is refused") as info:
        analyze(path)
    assert (info.value.line, info.value.column) == at(text, marker)


_TIMED = """\
import re, sys, time
from blockgraph.spec import patterns
slowest = 0.0
for pattern in sys.argv[1:]:
    compiled = patterns.compile(pattern)
    for key in ("a" * 1000 + "b", "ab" * 500 + "!", "1" * 1000 + "!", "a." * 500 + "!"):
        start = time.perf_counter()
        compiled.search(key)
        slowest = max(slowest, time.perf_counter() - start)
print(slowest)
"""
WORST = [r"a+c", r"\d+(?:ab|ba)*?$", r"(?:a|b)+c", r"[^.]+\.x", r"(\d+\.)+x", r"\w+\s", r"[^x]*x$", r"a*b*c*d"]


def test_accepted_patterns_match_fast_on_the_longest_keys() -> None:
    """Accepted patterns chosen to backtrack as much as they can, searched in keys of the longest accepted length
    (compiler.weights.MAX_KEY_CHARS): milliseconds, in a bounded process (a wrongly accepted pattern fails here
    instead of hanging the run)."""
    result = run_bounded(["-c", _TIMED, *WORST], timeout=60)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 0.1, result.stdout
