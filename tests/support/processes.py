"""Run code in a fresh interpreter: the CLI checked never to import torch, and hostile inputs under limits (a hang or
a blow-up fails the test instead of the CI run)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tests.conftest import ROOT

MEMORY_CAP = 1 << 30
"""Address space a hostile probe may use (RLIMIT_AS): a runaway allocation fails the probe, not the machine."""


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


def _cap_memory(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_bounded(
    argv: Sequence[Any], *, timeout: float = 30, memory: int = MEMORY_CAP
) -> subprocess.CompletedProcess[str]:
    """``argv`` (``python`` prepended) in a new process, killed after ``timeout`` seconds (the test fails with
    ``TimeoutExpired``) and unable to map more than ``memory`` bytes: a probe that hangs or balloons fails its test
    instead of the test run."""
    return subprocess.run(
        [sys.executable, *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        preexec_fn=lambda: _cap_memory(memory),
    )


_PROBE = """\
import json, sys, time
from blockgraph.errors import BlockgraphError
from blockgraph.spec import load
fast = load._FAST_LOADER
for function, argument, pure in json.loads(sys.stdin.read()):
    load._FAST_LOADER = None if pure else fast
    start = time.perf_counter()
    try:
        getattr(load, function)(argument)
        out = {"error": None}
    except BlockgraphError as e:
        out = {"error": type(e).__name__, "message": e.message, "hint": e.hint, "line": e.line}
    out["seconds"] = time.perf_counter() - start
    print(json.dumps(out), flush=True)
"""


def probe_loads(calls: Sequence[tuple[str, Any, bool]], *, timeout: float = 60) -> list[dict[str, Any]]:
    """``blockgraph.spec.load.<function>(argument)`` for each ``(function, argument, pure)`` (``pure``: without
    libyaml), in order, in one process under :func:`run_bounded`: for each, ``{"error": type name or None,
    "message", "hint", "line", "seconds"}``."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        input=json.dumps([(f, str(a), p) for f, a, p in calls]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        preexec_fn=lambda: _cap_memory(MEMORY_CAP),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


@dataclass(frozen=True)
class Capped:
    """How a capped command ended: exit status (None: killed at the time cap), output, and seconds taken."""

    code: int | None
    out: str
    err: str
    seconds: float


TORCH_MEMORY_CAP = 4 << 30
"""Address space for a probe of a command that imports torch (torch alone maps about 1.5 GiB here)."""


def run_capped(*argv: str, timeout: float = 30.0) -> Capped:
    """``python cli.py ARGV`` under :func:`run_bounded` (with :data:`TORCH_MEMORY_CAP`), timed; ``code`` is None
    when it had to be killed."""
    start = time.perf_counter()
    try:
        done = run_bounded([ROOT / "cli.py", *argv], timeout=timeout, memory=TORCH_MEMORY_CAP)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return Capped(None, out, err, time.perf_counter() - start)
    return Capped(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)
