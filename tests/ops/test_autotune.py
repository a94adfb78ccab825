"""The autotuner (blockgraph/ops/autotune.py): a choice measured once per shape and device, kept per device, timed
with the device synchronized, and never measured where nothing runs (meta) or nothing may wait (a CUDA graph being
captured)."""

from __future__ import annotations

import time

import pytest
import torch

from blockgraph.ops import autotune

CPU, META, CUDA = torch.device("cpu"), torch.device("meta"), torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    """No choice remembered, and the default rounds (the suite measures one: tests/conftest.py)."""
    monkeypatch.setattr(autotune, "ROUNDS", autotune.DEFAULT_ROUNDS)
    monkeypatch.setattr(autotune, "MAX_ROUNDS", autotune.DEFAULT_MAX_ROUNDS)
    autotune.reset()
    yield
    autotune.reset()


@pytest.mark.parametrize(
    ("value", "rounds"),
    [("", (5, 15)), ("1", (1, 1)), (" 7 ", (7, 7)), ("0", (5, 15)), ("-3", (5, 15)), ("2.5", (5, 15)),
     ("1001", (5, 15)), ("9" * 5000, (5, 15)), ("x", (5, 15))],
)  # fmt: skip
def test_rounds_come_from_the_environment_or_the_defaults(monkeypatch, value, rounds) -> None:
    monkeypatch.setenv("BLOCKGRAPH_AUTOTUNE_ROUNDS", value)
    assert autotune._rounds_from_environment() == rounds


def _probe(runs: dict[str, int], slow: str) -> dict[str, object]:
    """Two candidates counting their runs; ``slow`` sleeps 2 ms per run."""

    def run(name: str) -> None:
        runs[name] += 1
        if name == slow:
            time.sleep(0.002)

    return {name: (lambda name=name: run(name)) for name in runs}


def test_the_autotuner_measures_once_per_shape_and_keeps_the_faster_kernel(monkeypatch) -> None:
    """The first call of a shape times both kernels and remembers the faster; later calls reuse the choice without
    measuring; a kernel that is slower than the default by design is never chosen; off, the default is taken."""
    runs = {"fused": 0, "plain": 0}
    candidates = _probe(runs, slow="plain")
    assert autotune.choose(("probe", 1), candidates, device=CPU) == "fused"
    measured = dict(runs)
    assert measured["plain"] == autotune.ROUNDS + 1  # a warm-up, then the timed rounds
    assert autotune.choose(("probe", 1), candidates, device=CPU) == "fused" and runs == measured  # remembered
    (key, choice), *_ = autotune.choices().items()
    assert key[:3] == ("probe", 1, CPU) and choice.seconds["plain"] > choice.seconds["fused"]
    faster = _probe({"fused": 0, "plain": 0}, slow="fused")  # now the non-default is faster: chosen
    assert autotune.choose(("probe", 2), faster, device=CPU) == "plain"
    with autotune.tuning(False):
        assert autotune.choose(("probe", 3), faster, device=CPU) == "fused"
    monkeypatch.setenv("BLOCKGRAPH_AUTOTUNE_LOG", "1")
    autotune.choose(("probe", 4), faster, device=CPU)
    autotune.reset()
    assert autotune.choices() == {}


def test_a_choice_made_on_one_device_does_not_decide_for_another(monkeypatch) -> None:
    """The device is part of the key: the CPU's choice (the non-default, measured faster) is not taken on another
    device, which is measured on its own (here a CUDA device stood in for: its synchronization is a no-op)."""
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    on_cpu = _probe({"fused": 0, "plain": 0}, slow="fused")
    assert autotune.choose(("probe",), on_cpu, device=CPU) == "plain"
    runs = {"fused": 0, "plain": 0}
    assert autotune.choose(("probe",), _probe(runs, slow="plain"), device=CUDA) == "fused"
    assert runs["fused"] == runs["plain"] == autotune.ROUNDS + 1  # measured anew
    assert {key[-2]: choice.chosen for key, choice in autotune.choices().items()} == {CPU: "plain", CUDA: "fused"}


def test_on_an_accelerator_each_timed_run_waits_for_the_device(monkeypatch) -> None:
    """Kernels queued on a GPU run after the call returns: each timed run is preceded and followed by a
    synchronization of that device, so the time is the kernel's, not its launch's."""
    events: list[str] = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: events.append(f"sync {device}"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    candidates = {"fused": lambda: events.append("fused"), "plain": lambda: events.append("plain")}
    autotune.choose(("probe",), candidates, device=CUDA)
    timed = events[2:]  # after the warm-up run of each candidate
    assert events[:2] == ["fused", "plain"]
    rounds = next(iter(autotune.choices().values())).rounds
    runs = [name for r in range(rounds) for name in (("fused", "plain") if r % 2 == 0 else ("plain", "fused"))]
    assert timed == [e for name in runs for e in (f"sync {CUDA}", name, f"sync {CUDA}")]
    events.clear()
    autotune.choose(("probe", "cpu"), candidates, device=CPU)
    assert not any(e.startswith("sync") for e in events)  # the CPU runs an op when it is called


class _Clock:
    """A stand-in for the ``time`` module whose clock advances only by what the candidates script."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("plain", "chosen", "rounds"),
    [
        (0.5, "plain", autotune.DEFAULT_ROUNDS),  # clearly faster: chosen after the first rounds
        (2.0, "fused", autotune.DEFAULT_ROUNDS),  # clearly slower
        (0.95, "plain", autotune.DEFAULT_MAX_ROUNDS),  # close: measured on, then chosen (beyond the margin)
        (0.99, "fused", autotune.DEFAULT_MAX_ROUNDS),  # within the margin: the default stays
    ],
)
def test_candidates_are_compared_round_by_round_in_alternating_order(monkeypatch, plain, chosen, rounds) -> None:
    """Each round runs both candidates, the order alternating (ABBA); a round's load slows both of its runs (here
    each round is 1x, 10x or 3x slower than the last), and the choice compares, over the rounds, each candidate's
    time relative to the default's in the same round; a candidate within ``CLOSE`` of the default is measured for
    ``MAX_ROUNDS`` rounds, and is chosen only if ``MARGIN`` faster."""
    clock, order = _Clock(), []
    monkeypatch.setattr(autotune, "time", clock)
    loads = iter([1.0] + [1.0, 10.0, 3.0] * autotune.MAX_ROUNDS)  # the warm-up's, then each round's
    load = [1.0]

    def run(name: str, seconds: float) -> None:
        if len(order) % 2 == 0:  # the first run of a round: its load
            load[0] = next(loads)
        order.append(name)
        clock.now += seconds * load[0]

    candidates = {"fused": lambda: run("fused", 1.0), "plain": lambda: run("plain", plain)}
    assert autotune.choose(("probe",), candidates, device=CPU) == chosen
    choice = autotune.choices()[("probe", CPU, torch.get_num_threads())]
    assert choice.rounds == rounds and choice.relative == {"fused": 1.0, "plain": pytest.approx(plain)}
    assert order[2:6] == ["fused", "plain", "plain", "fused"]  # after the warm-up: ABBA


def test_nothing_is_measured_or_remembered_where_nothing_runs_or_nothing_may_wait(monkeypatch) -> None:
    """The meta device computes nothing, and a CUDA graph being captured may not synchronize: the default, unmeasured,
    and the next call (outside the capture) measures."""
    runs = {"fused": 0, "plain": 0}
    candidates = _probe(runs, slow="fused")
    assert autotune.choose(("probe",), candidates, device=META) == "fused"
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert autotune.choose(("probe",), candidates, device=CUDA) == "fused"
    assert runs == {"fused": 0, "plain": 0} and autotune.choices() == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert autotune.choose(("probe",), candidates, device=CUDA) == "plain"
    with autotune.forcing("plain"):  # forcing holds on every device
        assert autotune.choose(("other",), candidates, device=META) == "plain"
