"""Import timm as a parity oracle for tests.

``import timm`` imports torchvision. The pinned torchvision wheel (built for
torch 2.13.0) ships compiled ops that need CUDA libraries, so with CPU-only
torch its ``_C`` extension fails to load and ``torchvision._meta_registrations``
then dies with ``operator torchvision::nms does not exist``. Defining the
``torchvision::nms`` / ``torchvision::qnms`` schemas beforehand lets torchvision
(and therefore timm) import; the C++ ops themselves stay unavailable, which is
fine because timm's model code never calls them.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import torch

# Upstream schemas (torchvision/csrc/ops/nms.cpp and its quantized twin).
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

# Must stay alive: dropping the Library object deregisters its definitions.
_torchvision_lib: torch.library.Library | None = None


def _is_missing_torchvision_op(exc: BaseException) -> bool:
    msg = str(exc)
    return "torchvision::" in msg and "does not exist" in msg


def _define_torchvision_schemas() -> None:
    """Define the op schemas torchvision's meta registrations expect (once)."""
    global _torchvision_lib
    if _torchvision_lib is not None:
        return
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        lib.define(schema)
    _torchvision_lib = lib


def _purge(prefixes: tuple[str, ...]) -> None:
    """Drop half-imported modules left behind by a failed import."""
    for name in list(sys.modules):
        if name.split(".", 1)[0] in prefixes:
            del sys.modules[name]


def import_timm() -> ModuleType:
    """Return the ``timm`` module, working around the CPU torchvision import failure.

    Tries a plain ``import timm`` first; only if that fails because a
    ``torchvision::`` operator does not exist are the nms/qnms schemas defined
    and the import retried. Calls ``pytest.skip`` if timm (or torchvision) is
    not installed at all.
    """
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as exc:
        import pytest  # here only: bench/ scripts time processes that import this module

        pytest.skip(f"timm oracle unavailable: {exc} (run `make .venv/.stamp`)", allow_module_level=True)
    except RuntimeError as exc:
        if not _is_missing_torchvision_op(exc):
            raise
    _purge(("timm", "torchvision"))
    _define_torchvision_schemas()
    return importlib.import_module("timm")


def set_fused(flag: bool) -> None:
    """Enable/disable timm's fused ``F.scaled_dot_product_attention`` path.

    timm reads this flag when attention modules are *constructed*, so call it
    before :func:`create_timm`. The global setting persists for the process.
    (CoaT's factorized attention ignores it; ViT-style blocks honour it.)
    """
    import_timm().layers.set_fused_attn(flag)


def create_timm(name: str, **kwargs: Any) -> torch.nn.Module:
    """Build timm model ``name`` with random init (``pretrained=False``).

    The fused-attention setting is left as is; use :func:`set_fused` to choose.
    """
    return import_timm().create_model(name, pretrained=False, **kwargs)
