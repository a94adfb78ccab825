"""Kernel choice by measurement: where an op has several eager inference kernels for the same values (oneDNN's fused
matrix multiply or the plain ``F.linear`` then the activation), which one is faster depends on the CPU, the shape and
the threads: on one AMD EPYC oneDNN won by 20%, on another of the same kind it lost by as much. So the first call of
each shape times every candidate on this machine and the fastest is kept for the process, as
``torch.backends.cudnn.benchmark`` does for convolutions.

- :func:`choose` picks (and remembers) a candidate for a key (the op, the shapes, dtype) on a device, and
  :func:`run_chosen` runs it: a choice is kept per device (and thread count), so one measured on the CPU never
  decides for a GPU.
- :func:`choices` shows what was chosen, with the times measured; ``BLOCKGRAPH_AUTOTUNE_LOG=1`` prints each choice
  as it is made (stderr).
- ``BLOCKGRAPH_AUTOTUNE=0`` (or :func:`tuning` ``(False)``) turns the search off: the first candidate, the default,
  is taken without measuring (deterministic runs, benchmarks of a fixed choice). :func:`forcing` makes every op
  take a named candidate (tests check that each gives the same values).

The candidates are measured in rounds after a warm-up, each round running every candidate once, in an order that
alternates between rounds (ABBA: neither runs always first, on colder caches); a candidate is compared with the
default by the median over the rounds of its time divided by the default's in the same round (paired: a burst of
load on a shared machine that slows both runs of a round cancels, one that hits a single run is an outlier the
median ignores). A candidate must be :data:`MARGIN` faster than the default to be chosen, so that noise does not
flip a choice; when after :data:`ROUNDS` rounds a candidate is within :data:`CLOSE` of the default, rounds go on up
to :data:`MAX_ROUNDS` (on a 2-core AMD EPYC without AVX-512, oneDNN's and MKL's products of a ConvNeXt-T layer
differ by 0-10% and single runs by 10-20%: 5 rounds chose differently from one process to the next for 4 of its 9
shapes). Measuring costs a few runs of the op at each new shape: once per process. On an accelerator, whose kernels run
asynchronously, each timed run waits for the device before and after (``torch.accelerator.synchronize``); where that
is impossible (a CUDA graph being captured) or meaningless (the meta device, which computes nothing), the default is
taken without measuring and nothing is remembered. ``BLOCKGRAPH_AUTOTUNE_ROUNDS=N`` measures N rounds, no more (the
test suite takes 1: every choice still measured, both candidates run, at a fifth of the cost).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

DEFAULT_ROUNDS, DEFAULT_MAX_ROUNDS = 5, 15


def _rounds_from_environment() -> tuple[int, int]:
    """``BLOCKGRAPH_AUTOTUNE_ROUNDS=N`` (a whole number from 1 to 1000): N rounds, no more and no less (the choice is
    still measured, on fewer runs: quicker first calls, noisier choices; the test suite takes 1); anything else: the
    defaults."""
    text = os.environ.get("BLOCKGRAPH_AUTOTUNE_ROUNDS", "").strip()
    if text.isdigit() and len(text) <= 4 and 1 <= int(text) <= 1000:
        return int(text), int(text)
    return DEFAULT_ROUNDS, DEFAULT_MAX_ROUNDS


ROUNDS, MAX_ROUNDS = _rounds_from_environment()
"""Timed runs of each candidate (after one warm-up each): at least ``ROUNDS``, at most ``MAX_ROUNDS`` (when a
candidate's time is within :data:`CLOSE` of the default's); 5 and 15 unless ``BLOCKGRAPH_AUTOTUNE_ROUNDS`` says."""
MARGIN = 0.03
"""How much faster than the default (the first candidate) another must be to be chosen: 3%."""
CLOSE = 0.10
"""A candidate within this fraction of the default's time after :data:`ROUNDS` rounds is measured on, up to
:data:`MAX_ROUNDS`."""


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` decided for a key: the candidate, the median seconds of each one measured, its median
    time relative to the default's in the same round (the paired ratio the choice compares), and the rounds
    timed."""

    chosen: str
    seconds: dict[str, float]
    relative: dict[str, float]
    rounds: int


_CHOICES: dict[tuple[Any, ...], Choice] = {}
_state = {"enabled": os.environ.get("BLOCKGRAPH_AUTOTUNE", "1") != "0", "forced": None}


def enabled() -> bool:
    """Whether kernels are chosen by measuring (``BLOCKGRAPH_AUTOTUNE``, :func:`tuning`)."""
    return bool(_state["enabled"])


@contextlib.contextmanager
def tuning(enable: bool) -> Iterator[None]:
    """Within it, kernels are (``True``) or are not (``False``: each op's default) chosen by measuring."""
    before = _state["enabled"]
    _state["enabled"] = enable
    try:
        yield
    finally:
        _state["enabled"] = before


@contextlib.contextmanager
def forcing(candidate: str | None) -> Iterator[None]:
    """Within it, every op that has a candidate of this name runs it (for tests and benchmarks of one kernel)."""
    before = _state["forced"]
    _state["forced"] = candidate
    try:
        yield
    finally:
        _state["forced"] = before


def choose(
    key: tuple[Any, ...], candidates: dict[str, Callable[[], Any]], *, device: torch.device, training: bool = False
) -> str:
    """The name of the candidate to run for ``key`` on ``device``: forced (:func:`forcing`), else remembered, else
    measured now (the default, the first candidate, when measuring is off or cannot be done on ``device``).

    Args:
        key: what the choice depends on (the op, shapes, dtype, ...); the device and thread count are added here.
        candidates: name → a call computing the op's result, each with the same values; the first is the default.
        device: where the candidates run (the op's input's device).
        training: the candidates are training kernels (each a ``functools.partial``): time each one's forward and
            backward (:func:`step`), not its call alone.
    """
    forced = _state["forced"]
    if forced is not None and forced in candidates:
        return forced
    default = next(iter(candidates))
    if not _state["enabled"] or len(candidates) == 1:
        return default
    key = (*key, device, torch.get_num_threads())
    found = _CHOICES.get(key)
    if found is not None and found.chosen in candidates:
        return found.chosen
    if not _measurable(device):
        return default
    timed = {name: partial(step, call) for name, call in candidates.items()} if training else candidates
    choice = _measure(timed, device)
    _CHOICES[key] = choice
    if os.environ.get("BLOCKGRAPH_AUTOTUNE_LOG"):
        times = ", ".join(
            f"{name} {s * 1e6:.0f} us ({choice.relative[name]:.3f})" for name, s in choice.seconds.items()
        )
        print(f"blockgraph autotune: {key}: {choice.chosen} ({times}; {choice.rounds} rounds)", file=sys.stderr)
    return choice.chosen


def chosen(key: tuple[Any, ...], *, device: torch.device) -> str | None:
    """The candidate remembered for ``key`` on ``device`` (measured before, at the current thread count), if any."""
    found = _CHOICES.get((*key, device, torch.get_num_threads()))
    return None if found is None else found.chosen


def run_chosen(
    key: tuple[Any, ...], candidates: dict[str, Callable[[], Any]], *, device: torch.device, training: bool = False
) -> Any:
    """The result of the candidate :func:`choose` picks for ``key`` on ``device`` (``training``: see there)."""
    return candidates[choose(key, candidates, device=device, training=training)]()


def step(call: partial[torch.Tensor]) -> None:
    """A training kernel's share of a step, what :func:`choose` times for it: ``call`` (a ``functools.partial``)
    forward and backward (the gradients of its tensor arguments that require them, from an output gradient of ones
    in the output's layout), on detached copies of those (nothing reaches the arguments' own gradients). The
    tensors it saves for its backward bypass the saved-tensor hooks in force (activation checkpointing counts and
    packs those of the forward it may later recompute: the probe is not part of it)."""
    if not isinstance(call, partial):
        raise TypeError(f"a training candidate must be a functools.partial (its arguments are copied), got {call!r}")
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
        args = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in call.args]
        y = call.func(*args, **call.keywords)
        wanted = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        torch.autograd.grad(y, wanted, torch.ones_like(y))


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _measurable(device: torch.device) -> bool:
    """Whether candidates can be timed on ``device`` now: not on the meta device (nothing runs), not while a CUDA
    graph is captured (waiting for the device is an error there, and captured kernels do not run)."""
    if device.type == "meta":
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _synchronize(device: torch.device) -> None:
    """Wait until ``device`` has run the kernels queued so far (the CPU runs an op when it is called)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _measure(candidates: dict[str, Callable[[], Any]], device: torch.device) -> Choice:
    names = list(candidates)
    default = names[0]
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():  # (a call timing a training kernel turns gradients on for itself)
        for call in candidates.values():  # warm-up: first-call costs (oneDNN primitive creation) are not the kernel's
            call()
        rounds = 0
        while rounds < ROUNDS or (rounds < MAX_ROUNDS and _close(_relative(samples, default))):
            for name in names if rounds % 2 == 0 else reversed(names):
                _synchronize(device)
                start = time.perf_counter()
                candidates[name]()
                _synchronize(device)
                samples[name].append(time.perf_counter() - start)
            rounds += 1
    relative = _relative(samples, default)
    best = min(relative, key=relative.__getitem__)
    chosen = best if relative[best] < 1 - MARGIN else default
    return Choice(chosen, {name: statistics.median(s) for name, s in samples.items()}, relative, rounds)


def _relative(samples: dict[str, list[float]], default: str) -> dict[str, float]:
    """Each candidate's median, over the rounds, of its time divided by the default's in the same round."""
    base = samples[default]
    return {
        name: statistics.median(t / max(b, 1e-9) for t, b in zip(s, base, strict=True)) for name, s in samples.items()
    }


def _close(relative: dict[str, float]) -> bool:
    """Whether a candidate other than the default is within :data:`CLOSE` of it (the choice needs more rounds)."""
    return any(abs(r - 1) < CLOSE for r in list(relative.values())[1:])


def choices() -> dict[tuple[Any, ...], Choice]:
    """Every choice made so far in this process, by key (a copy)."""
    return dict(_CHOICES)


def reset() -> None:
    """Forget every choice (the next call of each shape measures again)."""
    _CHOICES.clear()
