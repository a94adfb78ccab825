"""Run the CLI in a fresh interpreter and check that it never imported torch."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def run_without_torch(*argv: str) -> subprocess.CompletedProcess[str]:
    """``blockgraph.cli.main(argv)`` in a new process; it fails (assertion, exit 1) if torch got imported."""
    code = (
        "import sys\n"
        "from blockgraph.cli import main\n"
        f"rc = main({[str(a) for a in argv]!r})\n"
        f"assert 'torch' not in sys.modules, '{argv[0]} imported torch'\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
