"""Run the CLI in a fresh interpreter: checking that it never imported torch, or capped in time and memory (hostile
input: a hang or a blow-up fails the test instead of the CI run)."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from dataclasses import dataclass

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


MEMORY_CAP = 4 << 30
"""Address space a capped command may map (torch alone maps about 1.5 GiB here)."""


@dataclass(frozen=True)
class Capped:
    """How a capped command ended: exit status (None: killed at the time cap), output, and seconds taken."""

    code: int | None
    out: str
    err: str
    seconds: float


def _cap_memory() -> None:  # in the child, before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_capped(*argv: str, timeout: float = 30.0, cwd: str | None = None) -> Capped:
    """``python cli.py ARGV`` in a new process with at most :data:`MEMORY_CAP` bytes of memory and ``timeout``
    seconds; ``code`` is None when it had to be killed."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), *map(str, argv)],
            capture_output=True,
            text=True,
            cwd=cwd or ROOT,
            timeout=timeout,
            preexec_fn=_cap_memory,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return Capped(None, out, err, time.perf_counter() - start)
    return Capped(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)
