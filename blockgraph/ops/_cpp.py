"""Build-on-demand loader of blockgraph's C++ CPU kernels: :func:`blockgraph.ops.ms_deform_attn`'s
(``csrc/ms_deform_attn.cpp``) and the depthwise convolution's weight gradient (``csrc/depthwise_conv.cpp``).

The kernels are compiled once, as one library, with ``torch.utils.cpp_extension.load`` (cached in the torch
extensions directory, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``; rebuilt when a source or the flags
change) and register the ops ``torch.ops.blockgraph_msda.forward`` / ``.backward`` and
``torch.ops.blockgraph_conv.depthwise_weight_grad``. When no compiler is available or the build
fails, :func:`load` warns once and returns ``False``, and callers use the pure-PyTorch paths. ``BLOCKGRAPH_NO_CPP=1``
skips the build altogether.

torch serializes builds with a lock file in the build directory (``<dir>/<name>/lock``, a ``FileBaton``) and waits
for it with no end: a process killed while compiling leaves it behind, and every later process would hang. Here the
wait is bounded: a lock that no process holds open any more (Linux, where ``/proc`` says so), or that is older
than :data:`STALE_LOCK_SECONDS`, is stale, and the pure path is used, with a warning naming the file to delete.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SOURCES = [Path(__file__).resolve().parent / "csrc" / name for name in ("ms_deform_attn.cpp", "depthwise_conv.cpp")]
EXTENSION_NAME = "blockgraph_kernels"
CFLAGS = ["-O3", "-fopenmp"]
"""-fopenmp: at::parallel_for is an inline ``#pragma omp parallel`` in torch's OpenMP builds."""
LDFLAGS = ["-fopenmp"]
DISABLE_ENV = "BLOCKGRAPH_NO_CPP"
STALE_LOCK_SECONDS = 60.0
"""A build lock older than this is stale whoever holds it (a build of the kernel takes seconds)."""
DEAD_OWNER_SECONDS = 1.0
"""A build lock that no process has held open for this long is stale (where that can be seen: Linux's /proc)."""

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_failure = ""
_load_seconds = 0.0
_after_load: list[Callable[[], None]] = []


def after_load(hook: Callable[[], None]) -> None:
    """Run ``hook`` once the ops are registered (at once if they already are): fake kernels, autograd formulas."""
    _after_load.append(hook)
    if _loaded:
        hook()


def disabled_by_env() -> bool:
    """Whether ``BLOCKGRAPH_NO_CPP`` asks for the pure-PyTorch path."""
    return os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")


def load(*, verbose: bool = False) -> bool:
    """Build (first time) and load the kernels; ``True`` when their ops (``torch.ops.blockgraph_msda``,
    ``torch.ops.blockgraph_conv``) are usable.

    Never raises: a failure is reported once as a :class:`RuntimeWarning` and remembered for the process.
    ``False`` without trying while ``BLOCKGRAPH_NO_CPP`` is set.
    """
    global _loaded, _failure, _load_seconds
    if disabled_by_env():
        return False
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        start = time.perf_counter()
        try:
            from torch.utils import cpp_extension

            with _bounded_lock_wait(cpp_extension):
                cpp_extension.load(
                    name=EXTENSION_NAME,
                    sources=[str(source) for source in SOURCES],
                    extra_cflags=CFLAGS,
                    extra_ldflags=LDFLAGS,
                    is_python_module=False,
                    verbose=verbose,
                )
        except Exception as e:  # no compiler, no ninja, a compile error: all mean "use the pure path"
            _failure = _summary(e)
            _loaded = False
            warnings.warn(
                f"blockgraph.ops: the C++ kernels (ms_deform_attn, depthwise convolution) could not be built "
                f"({_failure}); using the pure-PyTorch paths (set {DISABLE_ENV}=1 to skip the build)",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            for hook in _after_load:
                hook()
            _loaded = True
        _load_seconds = time.perf_counter() - start
        return _loaded


class StaleLockError(TimeoutError):
    """The kernel's build lock was left by a build that did not finish."""


@contextlib.contextmanager
def _bounded_lock_wait(cpp_extension: Any) -> Iterator[None]:
    """While the kernel loads, torch waits for another build's lock as :func:`wait_for_lock` does (bounded), not
    forever. (torch takes no timeout: its ``FileBaton`` is swapped for the duration, under :data:`_lock`.)"""
    original = cpp_extension.FileBaton

    class BoundedBaton(original):  # type: ignore[misc, valid-type]
        def wait(self) -> None:
            wait_for_lock(self.lock_file_path, self.wait_seconds)

    cpp_extension.FileBaton = BoundedBaton
    try:
        yield
    finally:
        cpp_extension.FileBaton = original


def wait_for_lock(path: str, poll_seconds: float = 0.1) -> None:
    """Wait until the build lock ``path`` is released by the build that holds it.

    Raises:
        StaleLockError: the lock is stale: no process has held it open for :data:`DEAD_OWNER_SECONDS` (where
            that can be seen), or it is older than :data:`STALE_LOCK_SECONDS`.
    """
    unheld_since = None
    while True:
        try:
            age = time.time() - os.path.getmtime(path)
        except FileNotFoundError:
            return  # released
        held = _held_open(path)
        now = time.monotonic()
        unheld_since = (unheld_since or now) if held is False else None
        if age > STALE_LOCK_SECONDS or (unheld_since is not None and now - unheld_since >= DEAD_OWNER_SECONDS):
            why = "no process holds it" if unheld_since is not None else f"it is {age:.0f} s old"
            raise StaleLockError(
                f"the build lock {path} is stale ({why}: a build was stopped before it finished); "
                "delete it to build the kernel again"
            )
        time.sleep(poll_seconds)


def _held_open(path: str) -> bool | None:
    """Whether some process holds ``path`` open, from Linux's ``/proc``; None where that cannot be known (no
    ``/proc``, or processes whose open files this one may not see)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    target = os.path.realpath(path)
    unknown = False
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except PermissionError:
            unknown = True
            continue
        except OSError:  # the process ended
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
    return None if unknown else False


def _summary(error: Exception) -> str:
    """One line for a build failure: the first compiler error if there is one, else the message's last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first_error = next((line for line in lines if " error: " in line), None)  # gcc's "file:line:col: error: ..."
    return f"{type(error).__name__}: {first_error or (lines[-1] if lines else '')}"


def failure() -> str:
    """Why the kernel is unavailable (empty when it is loaded, or was not tried yet)."""
    return f"disabled by {DISABLE_ENV}=1" if disabled_by_env() else _failure


def load_seconds() -> float:
    """Wall-clock seconds :func:`load` took (a build, or only loading the cached library)."""
    return _load_seconds
