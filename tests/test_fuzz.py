"""Fuzzing the pipeline: random edits of the reference specs must give exit 0 or 2 from `validate`, never a
traceback or an internal error (exit 3)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockgraph.cli import main
from tests.conftest import SPECS
from tests.support.cost import assert_static_costs_match

TEXTS = {p.name: p.read_text() for p in SPECS}
NASTY = [
    "-1", "0", "1e400", "999999999999", "nan", "null", "true", "[]", "{}", "''", "\"${x}\"", "${", "}", "&a", "*a",
    "!!int x", "!!float", "[1, [2, [3]]]", "{3: 0}", "\"${1/0}\"", "\"${dims[99]}\"", "\"${10**100}\"", "- -", ":",
    "\t", "#", "%YAML 1.1", "---", "\"\\x00\"", "~", "2.5", "1_000", "0x10", "1e9", "-0.5", "3.0", "0.0", "[64, 128]", "{a: 1}", "!!python/name:os.system", "\"${range(10**9)}\"", "@", "`",
]  # fmt: skip


NAMES = ["class", "None", "if", "lambda", "forward", "training", "to", "eval", "type", "_modules", "__class__",
         "__init__", "spec", "code", "outputs", "nodes", "pe.5", "pe.0", "blocks.0", "blocks.7", "s1", "head.0"]  # fmt: skip
"""Names a block, stage or shared module may be given that Python, ``nn.Module`` or the model already use."""
NUMBERS = [".inf", "-.inf", ".nan", "1e18", "1e308", "-1e308", "18446744073709551617", "9" * 5000, "0.0", "-0",
           "1e-320", "0x7fffffffffffffff"]  # fmt: skip
"""Non-finite, huge and denormal numbers."""

KEYS = sorted({line.split(":")[0].strip(" -") for text in TEXTS.values() for line in text.split("\n") if ":" in line}
              - {""})  # fmt: skip
"""Every key the reference specs use: a renamed key becomes another real key (or a misspelt one)."""


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str]:
    """A reference spec with one to three line edits: delete, duplicate, rename a key, give a value of another type
    (zero, negative, huge, float, a list, a tag, an expression that fails), re-indent, swap, truncate, or point a
    reference (``from:``, a shared module) at a node that does not exist."""
    name = draw(st.sampled_from(sorted(TEXTS)))
    lines = TEXTS[name].split("\n")
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(
            ["delete", "duplicate", "rename", "value", "dangle", "indent", "swap", "cut", "name", "number", "alias"]
        ))  # fmt: skip
        line = lines[i]
        key, colon, rest = line.partition(":")
        if action == "delete":
            del lines[i]
        elif action == "duplicate":
            lines.insert(i, line)
        elif action == "rename" and colon:
            indent = key[: len(key) - len(key.lstrip(" -"))]
            other = draw(st.sampled_from(KEYS) | st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8))
            lines[i] = f"{indent}{other}:{rest}"
        elif action == "value" and colon:
            lines[i] = f"{key}: {draw(st.sampled_from(NASTY))}"
        elif action == "dangle" and colon:
            target = draw(st.sampled_from(["nowhere", "stage9.blocks", "input.x", "blocks.99", "stage1.nope"]))
            lines[i] = f"{key}: {target}"
        elif action == "name" and colon:
            lines[i] = f"{key}: {draw(st.sampled_from(NAMES))}" if key.strip(" -") == "name" else line
        elif action == "number" and colon:
            lines[i] = f"{key}: {draw(st.sampled_from(NUMBERS))}"
        elif action == "alias" and colon:  # an anchor here, and an alias (or a recursive one) of it elsewhere
            lines[i] = f"{key}: &fz {rest.strip() or '[]'}" if rest.strip()[:1] not in "&*|>" else line
            j = draw(st.integers(0, len(lines) - 1))
            target = lines[j].partition(":")
            if target[1] and j != i:
                lines[j] = f"{target[0]}: {draw(st.sampled_from(['*fz', '[*fz, *fz]', '{a: *fz}']))}"
        elif action == "indent":
            lines[i] = " " * draw(st.integers(0, 8)) + line.lstrip()
        elif action == "swap" and len(lines) > 1:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif action == "cut":
            lines[i] = line[: draw(st.integers(0, max(len(line), 1)))]
        if not lines:
            lines = [""]
    return name, "\n".join(lines)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """One directory holding every reference spec, so that `extends:` resolves; a case overwrites one file and
    puts it back afterwards."""
    directory: Path = tmp_path_factory.mktemp("fuzz")
    for other, content in TEXTS.items():
        (directory / other).write_text(content)
    return directory


@contextlib.contextmanager
def written(family: Path, case: tuple[str, str]) -> Iterator[Path]:
    name, text = case
    path = family / name
    path.write_text(text)
    try:
        yield path
    finally:
        path.write_text(TEXTS[name])


@settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated())
def test_validate_never_crashes(case: tuple[str, str], family: Path) -> None:
    """4,000 mutated specs: `validate` exits 0 or 2 with a formatted error, never a traceback or exit 3."""
    out, err = io.StringIO(), io.StringIO()
    with written(family, case) as path, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path)])
    assert code in (0, 2), err.getvalue()
    assert "internal error" not in err.getvalue() and "Traceback" not in err.getvalue()
    if code == 2:
        assert ": error: " in err.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated())
def test_what_validate_accepts_builds_and_runs(case: tuple[str, str], family: Path) -> None:
    """A spec that passes validate builds (meta device) and runs a forward at its default size, with the parameter
    and activation counts the budgets use equal to the built model's."""
    import blockgraph as bg

    with written(family, case) as path:
        try:
            report = bg.validate(path)
        except bg.BlockgraphError:
            return
        c, h, w = report.input
        try:
            model = bg.build_model(path, device="meta")
        except bg.BudgetError:
            return  # refused before allocation: a clean outcome
    assert_static_costs_match(model, h, w)  # runs a meta forward; the static parameter and memory counts are exact


FLAG_VALUES = ["-1", "0", "1", "2.5", "nan", "inf", "1e400", "9" * 5000, "", " ", "x", "3x64x64", "64x64", "0x0",
               "1000001x64", "999999x999999", "bogus", "meta", "cpu", "dim=64", "dim=.inf", "dim=[1, *a]", "a",
               "dim=2001-12-14", "dim=!!binary aGk=", "stages.s1.blocks.block.heads=3", "nope.nope=1", "=", "small"]  # fmt: skip
"""Values for any flag: negative, fractional, non-finite, huge, empty, malformed, and well-formed ones."""
COMMAND_FLAGS = {
    "validate": ["--input", "--set", "--variant", "--max-params", "--max-activation-bytes", "--batch"],
    "summary": ["--input", "--set", "--variant", "--batch"],
    "build": ["--input", "--set", "--max-params", "--batch", "--device", "--out"],
    "graph": ["--input", "--set", "--variant", "--format", "--out"],
    "export": ["--input", "--set", "--batch", "--opset", "--weights"],
    "schema": ["--out"],
    "docs": ["--out", "--all"],
    "list": ["--ops"],
}
"""Every command and the flags that take a value (list: a pattern). ``export`` always gets an ``--onnx`` target it
refuses before exporting (each export takes seconds): its flags and checks are fuzzed, not the exporter."""
PATHS = ["", "/dev/null", "DIR", "DIR/out.txt", "/proc/blockgraph-no/x", "DIR/nope/x", "DIR/model.safetensors"]
"""Values for the flags that name a file to write or read."""
TAKE_PATHS = {"--out", "--all", "--weights"}
SPEC_COMMANDS = {"validate", "summary", "build", "graph", "export"}


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMAND_FLAGS)))
    argv = [command, "SPEC"] if command in SPEC_COMMANDS else [command]
    if command == "list":
        argv.append(draw(st.sampled_from(["*", "coat*", "[", "x" * 300, "", "*" * 50])))
    for _ in range(draw(st.integers(1, 3))):
        flag = draw(st.sampled_from(COMMAND_FLAGS[command]))
        if flag == "--ops":
            argv.append(flag)
            continue
        argv += [flag, draw(st.sampled_from(PATHS if flag in TAKE_PATHS else FLAG_VALUES))]
    if command == "export":
        argv += ["--onnx", draw(st.sampled_from(["", "/dev/null", "DIR", "DIR/nope/x.onnx"]))]
    return argv


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines())
def test_flags_never_crash(argv: list[str], tmp_path_factory) -> None:
    """1,000 command lines of every command with any flag values (on a small spec): exit 0 or 2 (argparse's usage
    error included), never a traceback or exit 3."""
    from tests.test_broken_specs import VALID

    spec = tmp_path_factory.getbasetemp() / "flags.yaml"
    if not spec.exists():
        spec.write_text(VALID)
    directory = tmp_path_factory.getbasetemp() / "flag-outputs"
    directory.mkdir(exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    argv = [str(spec) if a == "SPEC" else a.replace("DIR", str(directory)) for a in argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: a flag given without a value
            code = e.code
    assert code in (0, 2), err.getvalue()
    assert "internal error" not in err.getvalue() and "Traceback" not in err.getvalue()
