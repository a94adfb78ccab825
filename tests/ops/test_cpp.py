"""Tests of blockgraph.ops._cpp's build: a lock left by a killed build never makes a process wait forever."""

from __future__ import annotations

import json
import os

import pytest

from blockgraph.ops import _cpp
from tests.support.processes import run_bounded

_SCRIPT = """\
import json, os, sys, threading, time, warnings
from torch.utils import cpp_extension
from blockgraph.ops import _cpp

os.environ["TORCH_EXTENSIONS_DIR"] = sys.argv[1]
os.environ.pop(_cpp.DISABLE_ENV, None)
_cpp.STALE_LOCK_SECONDS = 5.0  # (where /proc cannot tell whether the owner lives)


def compile_nothing(*args, **kwargs):
    raise AssertionError("the kernel was compiled")


cpp_extension._write_ninja_file_and_build_library = compile_nothing
lock = os.path.join(sys.argv[1], _cpp.EXTENSION_NAME, "lock")  # torch's FileBaton in the build directory
os.makedirs(os.path.dirname(lock), exist_ok=True)
for case in sys.argv[2:]:
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as FileBaton.try_acquire
    if case == "old":  # a build killed an hour ago
        os.close(fd)
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
    elif case == "dead":  # a build killed just now
        os.close(fd)
    else:  # a build that is running, and ends in 1.5 s
        threading.Timer(1.5, lambda: (os.close(fd), os.remove(lock))).start()
    _cpp._loaded = None
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = _cpp.load()
    seconds = time.perf_counter() - start
    messages = [str(w.message) for w in caught]
    print(json.dumps({"case": case, "loaded": loaded, "seconds": seconds, "warnings": messages}), flush=True)
    if os.path.exists(lock):
        os.remove(lock)
"""


@pytest.fixture(scope="module")
def lock_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Each kind of lock met by ``load()`` in a process of its own (killed after 60 s): nothing is compiled."""
    directory = tmp_path_factory.mktemp("torch_extensions")
    result = run_bounded(["-c", _SCRIPT, directory, "old", "dead", "held"], timeout=60, memory=8 << 30)
    assert result.returncode == 0, result.stderr[-3000:]
    return {case["case"]: case for case in map(json.loads, result.stdout.splitlines())}


@pytest.mark.parametrize(("case", "within"), [("old", 1.0), ("dead", 5.5)])
def test_a_stale_build_lock_falls_back_to_the_pure_path_with_a_warning(
    lock_cases: dict[str, dict], case: str, within: float
) -> None:
    out = lock_cases[case]
    assert out["loaded"] is False and out["seconds"] < within, out
    [message] = out["warnings"]
    assert "using the pure-PyTorch paths" in message and "StaleLockError" in message, message
    assert f"{_cpp.EXTENSION_NAME}{os.sep}lock is stale" in message, message
    assert "delete it to build the kernel again" in message, message


def test_a_build_in_progress_is_waited_for(lock_cases: dict[str, dict]) -> None:
    """The lock of a running build is waited for until released (then torch loads the library, which this test
    never built: that failure is the one reported, not the lock)."""
    out = lock_cases["held"]
    assert 1.4 < out["seconds"] < 5, out
    assert not any("StaleLockError" in message for message in out["warnings"]), out
