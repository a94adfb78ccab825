"""Timing helpers for benchmarks: interleaved runs in one process, medians, ratios (never absolute thresholds)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, alternating between them each round (so drift hits all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for key in order:
            start = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def process_time(argv: Sequence[str], *, repeat: int = 5, cwd: str | None = None) -> float:
    """Median wall-clock seconds of a whole process (start-up and imports included)."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(list(argv), check=True, capture_output=True, cwd=cwd)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]
