"""Tests of blockgraph.compiler.weights beyond the twins' parity: what a state_dict or a rename rule cannot do."""

from __future__ import annotations

from tests.support.processes import run_bounded

_LONG_KEY = """\
import time, torch
import blockgraph as bg
from blockgraph.compiler.weights import MAX_KEY_CHARS
model = bg.build_model("coat_lite_tiny", overrides={"depths": [1, 1, 1, 1]}, device="meta")
key = "a" * 10_000 + "b"
start = time.perf_counter()
try:
    bg.load_timm_state_dict(model, {key: torch.zeros(1)})
except bg.WeightsError as e:
    message = e.message
print(round(time.perf_counter() - start, 3), message)
"""


def test_a_10000_character_key_is_refused_at_once() -> None:
    """A key no model has, in a bounded process: refused before any rename pattern runs on it."""
    result = run_bounded(["-c", _LONG_KEY], timeout=120, memory=8 << 30)
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, message = result.stdout.split(" ", 1)
    assert float(seconds) < 0.5
    assert "not a name of at most 1,000 characters: 'aaaa" in message
    assert len(message) < 200
