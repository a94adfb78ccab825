"""Write torch modules in files that can be imported without importing torch.

A block file holds its params model, its shape rule and its module together, yet ``blockgraph validate`` must not
pay for ``import torch`` (seconds). So block files write::

    from blockgraph.blocks.lazy import F, Module, nn, torch

    class ConvPosEnc(Module):          # not nn.Module: torch is not imported yet
        def __init__(self, dim: int):
            super().__init__()
            self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

``torch``, ``nn`` and ``F`` are stand-ins that import the real module on first use. ``Module`` is a torch-free
base: instantiating a subclass for the first time creates (once, cached) the real class, a subclass of both the
written class and ``torch.nn.Module`` with the same name, and returns an instance of it. So the object *is* an
``nn.Module`` (``isinstance`` holds, parameters register, ``torch.compile`` traces it), and ``super().__init__()``
reaches ``nn.Module.__init__`` through the MRO. At that moment the stand-ins in the block file's globals are
replaced by the real modules, so ``forward`` pays nothing for the indirection.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


class _Lazy:
    """Stands in for a module until first attribute access."""

    def __init__(self, name: str):
        self._name = name

    def load(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name}>"


def lazy_module(name: str) -> Any:
    """A stand-in for any module that imports torch (``ops = lazy_module("blockgraph.ops")``)."""
    return _Lazy(name)


torch: Any = _Lazy("torch")
nn: Any = _Lazy("torch.nn")
F: Any = _Lazy("torch.nn.functional")
fused: Any = _Lazy("blockgraph.ops.fused")  # the eager-inference kernels

_REAL: dict[type, type] = {}


def _unlazy(module_name: str) -> None:
    """Replace the stand-ins bound in a module's globals by the real modules."""
    namespace = getattr(sys.modules.get(module_name), "__dict__", None)
    if namespace is None:
        return
    for key, value in list(namespace.items()):
        if isinstance(value, _Lazy):
            namespace[key] = value.load()


def realize(cls: type) -> type:
    """The real ``nn.Module`` subclass for a :class:`Module` subclass (created on first call)."""
    import torch.nn

    if issubclass(cls, torch.nn.Module):
        return cls
    real = _REAL.get(cls)
    if real is None:
        # torch is imported now: every loaded block file (helpers called from ``forward`` included, such as
        # ``blocks.base.memo``) gets the real modules, so that no stand-in is left for torch.compile to trip on.
        for name in [m for m in sys.modules if m.startswith("blockgraph.blocks")] + [k.__module__ for k in cls.__mro__]:
            _unlazy(name)
        qualname = f"_real_{cls.__qualname__.replace('.', '_')}"  # bound below, where pickle finds it by name
        real = type(
            cls.__name__,
            (cls, torch.nn.Module),
            {"__module__": cls.__module__, "__qualname__": qualname, "__doc__": cls.__doc__},
        )
        setattr(sys.modules[cls.__module__], qualname, real)
        _REAL[cls] = real
    return real


class Module:
    """A torch-free base for modules of block files; instances are real ``torch.nn.Module`` objects."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(realize(cls))
