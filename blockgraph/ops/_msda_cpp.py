"""Build-on-demand loader of the C++ kernels of :func:`blockgraph.ops.ms_deform_attn` (``csrc/ms_deform_attn.cpp``).

The kernels are compiled once with ``torch.utils.cpp_extension.load`` (cached in the torch extensions directory,
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``; rebuilt when the source or the flags change) and
register the ops ``torch.ops.blockgraph_msda.forward`` / ``.backward``. When no compiler is available or the build
fails, :func:`load` warns once and returns ``False``, and callers use the pure-PyTorch path. ``BLOCKGRAPH_NO_CPP=1``
skips the build altogether.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "csrc" / "ms_deform_attn.cpp"
EXTENSION_NAME = "blockgraph_msda"
CFLAGS = ["-O3", "-fopenmp"]
"""-fopenmp: at::parallel_for is an inline ``#pragma omp parallel`` in torch's OpenMP builds."""
LDFLAGS = ["-fopenmp"]
DISABLE_ENV = "BLOCKGRAPH_NO_CPP"

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
    """Build (first time) and load the kernels; ``True`` when ``torch.ops.blockgraph_msda`` is usable.

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
            from torch.utils.cpp_extension import load as load_extension

            load_extension(
                name=EXTENSION_NAME,
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as e:  # no compiler, no ninja, a compile error: all mean "use the pure path"
            _failure = _summary(e)
            _loaded = False
            warnings.warn(
                f"blockgraph.ops: the C++ kernel of ms_deform_attn could not be built ({_failure}); "
                f"using the pure-PyTorch path (set {DISABLE_ENV}=1 to skip the build)",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            for hook in _after_load:
                hook()
            _loaded = True
        _load_seconds = time.perf_counter() - start
        return _loaded


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
