"""Shared fixtures: the reference specs, and a small helper to run the CLI in-process."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
"""Every reference spec: the battery runs over all of them."""


@pytest.fixture
def run_cli():
    """Run ``blockgraph.cli.main`` in-process; returns (exit code, stdout, stderr)."""
    from blockgraph.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        return code, out.getvalue(), err.getvalue()

    return run
