"""Fuzzing the pipeline: random edits of the reference specs must give exit 0 or 2 from `validate`, never a
traceback or an internal error (exit 3)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockgraph.cli import main
from tests.conftest import SPECS

TEXTS = {p.name: p.read_text() for p in SPECS}
NASTY = [
    "-1", "0", "1e400", "999999999999", "nan", "null", "true", "[]", "{}", "''", "\"${x}\"", "${", "}", "&a", "*a",
    "!!int x", "!!float", "[1, [2, [3]]]", "{3: 0}", "\"${1/0}\"", "\"${dims[99]}\"", "\"${10**100}\"", "- -", ":",
    "\t", "#", "%YAML 1.1", "---", "\"\\x00\"", "~", "2.5", "1_000", "0x10", "\"${range(10**9)}\"", "@", "`",
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.sampled_from(sorted(TEXTS)))
    lines = TEXTS[name].split("\n")
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["delete", "duplicate", "value", "indent", "swap", "truncate"]))
        line = lines[i]
        if action == "delete":
            del lines[i]
        elif action == "duplicate":
            lines.insert(i, line)
        elif action == "value" and ":" in line:
            key, _, _ = line.partition(":")
            lines[i] = f"{key}: {draw(st.sampled_from(NASTY))}"
        elif action == "indent":
            lines[i] = " " * draw(st.integers(0, 8)) + line.lstrip()
        elif action == "swap" and len(lines) > 1:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif action == "truncate":
            lines[i] = line[: draw(st.integers(0, max(len(line), 1)))]
        if not lines:
            lines = [""]
    return name, "\n".join(lines)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated())
def test_validate_never_crashes(case: tuple[str, str], tmp_path_factory) -> None:
    name, text = case
    directory: Path = tmp_path_factory.mktemp("fuzz")
    for other, content in TEXTS.items():  # the family files, so `extends:` resolves
        (directory / other).write_text(content)
    path = directory / name
    path.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path)])
    assert code in (0, 2), err.getvalue()
    assert "internal error" not in err.getvalue() and "Traceback" not in err.getvalue()
    if code == 2:
        assert ": error: " in err.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated())
def test_what_validate_accepts_builds_and_runs(case: tuple[str, str], tmp_path_factory) -> None:
    """A spec that passes validate builds (meta device) and runs a forward at its default size."""
    import torch

    import blockgraph as bg

    name, text = case
    directory: Path = tmp_path_factory.mktemp("fuzz")
    for other, content in TEXTS.items():
        (directory / other).write_text(content)
    path = directory / name
    path.write_text(text)
    try:
        report = bg.validate(path)
    except bg.BlockgraphError:
        return
    c, h, w = report.input
    try:
        model = bg.build_model(path, device="meta")
    except bg.BudgetError:
        return  # refused before allocation: a clean outcome
    with torch.no_grad():
        model(torch.empty(1, c, h, w, device="meta"))
