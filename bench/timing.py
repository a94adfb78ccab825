"""Measurement helpers for benchmarks: interleaved runs in one process and medians (reported as ratios against a
reference measured in the same run, never as absolute thresholds), whole processes, peak allocated memory.

On a CUDA device (``device="cuda"``) a call returns before its kernels have run: each timed call is then preceded and
followed by ``torch.cuda.synchronize``, so its time is the whole computation's, and peak memory is read from CUDA's
caching allocator (``torch.cuda.max_memory_allocated``)."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence


def interleaved(
    fns: dict[str, Callable[[], object]], *, rounds: int = 15, warmup: int = 2, device: str = "cpu"
) -> dict[str, float]:
    """Median seconds per call of each function, alternating between them each round (so drift hits all alike)."""
    samples = interleaved_samples(fns, rounds=rounds, warmup=warmup, device=device)
    return {k: statistics.median(v) for k, v in samples.items()}


def interleaved_samples(
    fns: dict[str, Callable[[], object]], *, rounds: int = 15, warmup: int = 2, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds of each call of each function, in rounds that alternate between them (see :func:`interleaved`);
    on ``device`` "cuda", from a synchronized device to a synchronized device."""
    sync = synchronizer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for key in order:
            sync()
            start = time.perf_counter()
            fns[key]()
            sync()
            times[key].append(time.perf_counter() - start)
    return times


def synchronizer(device: str) -> Callable[[], None]:
    """A call that waits until ``device`` has run the work queued on it: nothing on the CPU (an op runs when it is
    called), ``torch.cuda.synchronize`` on a CUDA device (kernels run asynchronously)."""
    if device == "cpu":
        return lambda: None
    import torch

    return lambda: torch.cuda.synchronize(device)


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


def peak_allocated(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak tensor memory of one call, in bytes: the most that the call had allocated at any moment, above what was
    allocated before it (its outputs included).

    On the CPU, read from torch.profiler's allocation tracking (``profile_memory=True``): every allocation and free
    through torch's CPU allocator is an event with a size (negative for a free) and a time; the peak is the largest
    running sum. Deterministic for a given model and input (no page granularity, no allocator caching, no other
    process); memory a library allocates outside torch's allocator (BLAS workspaces) is not seen. On a CUDA device,
    ``torch.cuda.max_memory_allocated`` over the call (its peak statistic reset first) less what was allocated
    before: the caching allocator's count of the bytes its tensors held (each rounded up to its 512-byte blocks;
    the free blocks it keeps cached are not counted). Run a call once before measuring it: a library's workspace
    allocated on first use (cuBLAS's) is counted by the call that allocates it.
    """
    if device != "cpu":
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
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
