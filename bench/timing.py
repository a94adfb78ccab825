"""Measurement helpers for benchmarks: interleaved runs in one process and medians (reported as ratios against a
reference measured in the same run, never as absolute thresholds), whole processes, peak allocated memory."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence


def interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, alternating between them each round (so drift hits all alike)."""
    return {k: statistics.median(v) for k, v in interleaved_samples(fns, rounds=rounds, warmup=warmup).items()}


def interleaved_samples(
    fns: dict[str, Callable[[], object]], *, rounds: int = 15, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds of each call of each function, in rounds that alternate between them (see :func:`interleaved`)."""
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
    return times


def process(argv: Sequence[str], *, cwd: str | os.PathLike[str] | None = None) -> Callable[[], object]:
    """A call that runs a whole process (interpreter start-up and imports included); it raises if the process
    fails, with the end of its stderr. Time it with :func:`interleaved` like any other call."""
    argv = [str(a) for a in argv]

    def run() -> object:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()[-400:]}")
        return done

    return run


def python(code: str) -> list[str]:
    """The argv of a Python process (this interpreter) running ``code``."""
    return [sys.executable, "-c", code]


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side prints a line when it starts and stops)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_allocated(fn: Callable[[], object]) -> int:
    """Peak tensor memory of one call, in bytes: the most that the call had allocated at any moment, above what was
    allocated before it (its outputs included).

    Read from torch.profiler's allocation tracking (``profile_memory=True``): every allocation and free through
    torch's CPU allocator is an event with a size (negative for a free) and a time; the peak is the largest running
    sum. Deterministic for a given model and input (no page granularity, no allocator caching, no other process);
    memory a library allocates outside torch's allocator (BLAS workspaces) is not seen.
    """
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak
