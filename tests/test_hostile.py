"""Hostile input, each probe a command in a fresh process capped in time and memory (a hang or a blow-up fails the
test, not the CI run): names, numbers, flags, devices and plugins that once crashed (exit 3), hung or echoed what
they should not. Each must end as a clear error (exit 2, ``error:`` and ``hint:``, no traceback) within
:data:`LIMIT` seconds of the command's own start-up. (Spec edits with a position are in the broken-spec table.)"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.support.processes import Capped, run_capped
from tests.test_broken_specs import VALID

LIMIT = 5.0
"""Seconds a refusal may take beyond starting the command (measured once per command, on the valid spec)."""

PLUGINS = {
    "exits.py": "import sys\nsys.exit(0)\n",
    "interrupts.py": "raise KeyboardInterrupt\n",
    "blocks.py": """\
import sys
from typing import Literal
from blockgraph import BlockSpec, register


@register
class ExitsSpec(BlockSpec):
    op: Literal["exits"]

    def infer(self, ctx, x):
        sys.exit(0)


@register
class InterruptsSpec(BlockSpec):
    op: Literal["interrupts"]

    def infer(self, ctx, x):
        return x

    def build(self, ctx, x):
        raise KeyboardInterrupt
""",
}

HEAD = "  - {name: head, op: cls_head, from: s1.block"


def _with_block(op: str) -> str:
    return VALID.replace(HEAD, f"  - {{name: custom, op: {op}, from: s1.block}}\n{HEAD}")


@dataclass(frozen=True)
class Probe:
    id: str
    argv: tuple[str, ...]
    """The command; ``SPEC`` is the spec file written from :attr:`spec`, ``DIR`` the test's directory."""
    message: str
    """A regular expression the error line matches."""
    spec: str = VALID


PROBES = [
    Probe("--batch -1 (summary)", ("summary", "SPEC", "--batch", "-1"), r"batch must be a whole number from 1"),
    Probe("--batch -1 (build)", ("build", "SPEC", "--batch", "-1"), r"batch must be a whole number from 1"),
    Probe("--batch 0 (summary)", ("summary", "SPEC", "--batch", "0"), r"batch must be a whole number from 1"),
    Probe("--batch 2.5", ("validate", "SPEC", "--batch", "2.5"), r"--batch '2.5' is not a whole number"),
    Probe("--max-params nan", ("validate", "SPEC", "--max-params", "nan"), r"--max-params 'nan' is not a finite"),
    Probe("--max-params inf", ("validate", "SPEC", "--max-params", "1e400"), r"is not a finite number"),
    Probe("--max-activation-bytes -1", ("validate", "SPEC", "--max-activation-bytes", "-1"),
          r"max_activation_bytes must be a number above zero"),
    Probe("5,000-digit --input", ("validate", "SPEC", "--input", "9" * 5000 + "x64"),
          r"--input '9{36}\.\.\. \(5,003 characters\) is not CxHxW"),
    Probe("5,000-digit --set", ("validate", "SPEC", "--set", "dim=" + "9" * 5000), r"cannot read '9{36}\.\.\. \(5,000 characters\) as int"),
    Probe("--input past the size limit", ("build", "SPEC", "--input", "1000001x64"), r"between 1 and 1,000,000"),
    Probe("a ViT at 1000000x1000000", ("build", "vit_tiny_patch16_224", "--input", "1000000x1000000"),
          r"position embedding covers a 14x14 token grid"),
    Probe("--set a date, then --out", ("build", "SPEC", "--set", "classes=2001-12-14", "--out", "DIR/x.pt"),
          r"YAML tag 'tag:yaml.org,2002:timestamp' is not allowed"),
    Probe("--set !!binary", ("validate", "SPEC", "--set", "classes=!!binary aGVsbG8="), r"2002:binary' is not allowed"),
    Probe("--set a set", ("validate", "SPEC", "--set", "classes=!!set {a, b}"), r"2002:set' is not allowed"),
    Probe("--device bogus", ("build", "SPEC", "--device", "bogus"), r"unknown device 'bogus'"),
    Probe("--device cpu:3", ("build", "SPEC", "--device", "cpu:3"), r"device 'cpu:3' does not exist"),
    Probe("a plugin that exits", ("validate", "SPEC", "--plugin", "DIR/exits.py"), r"importing it called sys.exit\(0\)"),
    Probe("a plugin raising KeyboardInterrupt", ("validate", "SPEC", "--plugin", "DIR/interrupts.py"),
          r"importing it raised KeyboardInterrupt"),
    Probe("a shape rule that exits", ("validate", "SPEC", "--plugin", "DIR/blocks.py"),
          r"custom block 'custom' .* raised SystemExit: 0 in its shape rule", _with_block("exits")),
    Probe("a build raising KeyboardInterrupt", ("build", "SPEC", "--plugin", "DIR/blocks.py"),
          r"custom block 'custom' .* raised KeyboardInterrupt", _with_block("interrupts")),
]  # fmt: skip
if not torch.cuda.is_available():
    PROBES.append(Probe("--device cuda without CUDA", ("build", "SPEC", "--device", "cuda"), r"not available"))


_STARTUP: dict[str, float] = {}


def _startup(command: str, directory: Path) -> float:
    """Seconds the command takes on the valid spec (its imports: torch for build and summary)."""
    if command not in _STARTUP:
        spec = directory / "valid.yaml"
        spec.write_text(VALID)
        done = run_capped(command, spec)
        assert done.code == 0, done.err
        _STARTUP[command] = done.seconds
    return _STARTUP[command]


def _run(probe: Probe, directory: Path) -> Capped:
    for name, text in PLUGINS.items():
        (directory / name).write_text(text)
    spec = directory / "spec.yaml"
    spec.write_text(probe.spec)
    argv = [a.replace("SPEC", str(spec)).replace("DIR", str(directory)) for a in probe.argv]
    return run_capped(*argv)


@pytest.mark.parametrize("probe", PROBES, ids=[p.id for p in PROBES])
def test_hostile_input_is_a_clear_error(probe: Probe, tmp_path: Path) -> None:
    done = _run(probe, tmp_path)
    assert done.code is not None, f"hung: killed after {done.seconds:.0f} s"
    assert done.code == 2, (done.code, done.err[-2000:])
    assert "Traceback" not in done.err and "internal error" not in done.err, done.err[-2000:]
    first = done.err.splitlines()[0]
    assert ": error: " in first and re.search(probe.message, first), first
    assert any(line.startswith("hint: ") for line in done.err.splitlines()), done.err
    assert done.seconds < _startup(probe.argv[0], tmp_path) + LIMIT, f"{done.seconds:.1f} s"
    assert not list(tmp_path.glob("x.pt*")) and not list(tmp_path.glob(".blockgraph-*")), "wrote a file"


def test_values_of_any_plain_kind_go_into_a_checkpoint(tmp_path: Path) -> None:
    """What a spec may hold, `--set` may give, and a checkpoint keeps it: a mapping keyed by a number and a name."""
    spec, out = tmp_path / "spec.yaml", tmp_path / "x.pt"
    spec.write_text(VALID)
    done = run_capped("build", spec, "--set", "classes={1: a, b: [c, 2.5, null]}", "--out", out)
    assert done.code == 0, done.err
    import blockgraph as bg

    assert bg.load(out).spec_data["variables"]["classes"] in (
        {1: "a", "b": ["c", 2.5, None]},
        {"1": "a", "b": ["c", 2.5, None]},
    )
