"""docs/custom-blocks.md works as written: its files (the code blocks marked ``<!-- file: NAME -->``) are written
into a directory, its commands (``$ python cli.py ...`` in console blocks) run there, in order, in fresh processes,
and exit and print as shown (an ``error:`` line means exit 2; ``...`` stands for lines left out); the edit it shows
(``<!-- edit: NAME -->``: a line that replaces the one it extends) is applied where it stands. The model it builds
is checked too: forward and backward, static shapes against real ones, ``params()`` against the module."""

from __future__ import annotations

import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blockgraph as bg
from blockgraph.compiler.check import check_blocks
from blockgraph.graph import cost
from tests.conftest import ROOT
from tests.test_specs import _check_shapes

DOC = ROOT / "docs" / "custom-blocks.md"
FENCE = re.compile(r"(?:<!-- (file|edit): (\S+) -->\n)?```(\w+)\n(.*?)```", re.S)


def _steps() -> list[tuple[str, str, str]]:
    """The doc's code blocks that the test acts on, in order: ``(kind, name, text)`` with kind ``file``, ``edit``
    or ``console``."""
    steps = []
    for mark, name, language, text in FENCE.findall(DOC.read_text()):
        if mark:
            steps.append((mark, name, text))
        elif language == "console":
            steps.append(("console", "", text))
    return steps


def _shown(console: str) -> list[tuple[list[str], list[str]]]:
    """A console block's commands (argv after ``python cli.py``) with the output shown under each."""
    out: list[tuple[list[str], list[str]]] = []
    for line in console.splitlines():
        if line.startswith("$ "):
            argv = shlex.split(line[2:])
            assert argv[:2] == ["python", "cli.py"], line
            out.append((argv[2:], []))
        else:
            out[-1][1].append(line)
    return out


def _matches(shown: list[str], real: list[str]) -> bool:
    """Whether ``real`` is ``shown`` with each ``...`` line standing for any number of lines."""
    if not shown:
        return not real
    if shown[0] == "...":
        return any(_matches(shown[1:], real[i:]) for i in range(len(real) + 1))
    return bool(real) and real[0] == shown[0] and _matches(shown[1:], real[1:])


def test_matching_of_shown_output() -> None:
    assert _matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert _matches(["...", "c", "..."], ["a", "b", "c", "d"])
    assert not _matches(["a", "d"], ["a", "b", "c", "d"])
    assert not _matches(["a", "...", "x"], ["a", "b", "c", "d"])


def test_the_doc_works_as_written(tmp_path: Path) -> None:
    steps = _steps()
    assert [(kind, name) for kind, name, _ in steps if kind != "console"] == [
        ("file", "convnext.py"),
        ("file", "convnext_layers.py"),
        ("file", "convnext_mini.yaml"),
        ("file", "train.py"),
        ("edit", "convnext.py"),
    ]
    commands = 0
    for kind, name, text in steps:
        if kind == "file":
            (tmp_path / name).write_text(text)
        elif kind == "edit":
            path = tmp_path / name
            lines = path.read_text().splitlines()
            [new] = text.splitlines()
            [index] = [i for i, line in enumerate(lines) if line.strip() and new.startswith(line) and new != line]
            lines[index] = new
            path.write_text("\n".join(lines) + "\n")
        else:
            for argv, output in _shown(text):
                result = subprocess.run(
                    [sys.executable, ROOT / "cli.py", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300
                )
                expected = 2 if any(": error: " in line for line in output) else 0
                assert result.returncode == expected, (argv, result.stderr)
                real = (result.stdout + result.stderr).rstrip("\n").splitlines()
                assert _matches(output, real), (argv, "\n".join(real))
                commands += 1
    assert commands == 4
    assert "params() says 79,297 parameters, the module has 79,296" in steps[-1][2]


@pytest.fixture
def written(tmp_path: Path, monkeypatch, plugin_sandbox) -> Path:
    """The doc's files, as first written, in the current directory."""
    for kind, name, text in _steps():
        if kind == "file":
            (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_doc_model_trains_and_keeps_its_rules(written: Path, capsys) -> None:
    runpy.run_path("train.py", run_name="__main__")
    assert capsys.readouterr().out == "(2, 10) ConvNeXtBlock\n"
    spec = written / "convnext_mini.yaml"
    for size in [(224, 224), (96, 160)]:
        _check_shapes(spec, size)  # static shapes == the real forward's, node by node
    analysis = bg.analyze(spec)
    model = bg.build_model(spec).train()
    rules = cost.params(analysis.inference).nodes
    assert rules["stage1.blocks.0"] == 79_296
    assert {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in rules} == rules
    assert check_blocks(analysis.inference) == 5
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_validate_loads_the_spec_half_only(written: Path) -> None:
    code = (
        "import sys\n"
        "import blockgraph as bg\n"
        "bg.validate('convnext_mini.yaml')\n"
        "assert 'torch' not in sys.modules, 'validate imported torch'\n"
        "assert not [m for m in sys.modules if m.endswith('.convnext_layers')], 'the module half was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=written, check=True, timeout=120)
