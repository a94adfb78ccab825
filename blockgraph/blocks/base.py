"""What a block's ``build`` receives, and small torch helpers shared by block files (imported lazily)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from blockgraph.blocks.lazy import F, Module, fused, nn, torch

if TYPE_CHECKING:
    from blockgraph.types import Expr

Rate = Annotated[float, Field(ge=0.0, lt=1.0)]
"""A dropout-like probability in [0, 1) (dropout, drop path)."""


@dataclass(frozen=True)
class BuildContext:
    """Where and how a block's module is built: ``device``/``dtype`` go to every parameter (``meta`` works)."""

    node: str
    device: Any = None
    dtype: Any = None
    keep_tokens: int | None = None
    """For a block that ``trims_tokens``: return only this many leading tokens (None: all); see
    :attr:`~blockgraph.spec.schema.BlockSpec.trims_tokens`."""
    input_size: tuple[int, int] | None = None
    """The spec's input ``(H, W)``: a block may precompute what depends on it (a mask); the model takes other
    sizes too."""

    def at_input_size(self, size: Expr) -> int | None:
        """A size expression (of the symbols ``H``, ``W``) at :attr:`input_size`; None without one."""
        if self.input_size is None:
            return None
        return size.evaluate({"H": self.input_size[0], "W": self.input_size[1]})

    @property
    def dd(self) -> dict[str, Any]:
        """``{"device": ..., "dtype": ...}`` for layer constructors, timm style."""
        return {"device": self.device, "dtype": self.dtype}


def memo(cache: dict[Any, Any], key: Any, make: Any, limit: int = 8) -> Any:
    """``make()``, remembered in ``cache`` under ``key`` (per input size: masks, biases, reference points); the
    oldest entry goes past ``limit``. Under ``torch.compile`` it calls ``make()``, which the compiler traces into the
    graph (run on every call): what depends only on the spec's input size can be a buffer made at build instead
    (``BuildContext.input_size``; Swin's shift mask)."""
    if torch.compiler.is_compiling():
        return make()
    value = cache.get(key)
    if value is None:
        if len(cache) >= limit:
            cache.pop(next(iter(cache)))
        value = cache[key] = make()
    return value


_init_skipped = False


@contextlib.contextmanager
def init_elsewhere() -> Iterator[None]:
    """Within it, :func:`init_linear` draws nothing, so layers made by :func:`linear` hold uninitialized memory: for
    a caller that then initializes every one of them its own way (MobileViT's transformer: normal(0, 0.01), zero
    bias), so that the slow truncated normal is not drawn for nothing."""
    global _init_skipped
    before, _init_skipped = _init_skipped, True
    try:
        yield
    finally:
        _init_skipped = before


_NO_INIT: dict[type, type] = {}


def uninitialized(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``cls(*args, **kwargs)`` for a torch layer whose ``__init__`` ends with ``reset_parameters()`` (Linear,
    Conv2d), with its parameters allocated but not drawn: for a caller that draws them its own way right after.

    The layer is made as a subclass whose ``reset_parameters`` does nothing, then given its real class back, so it
    is exactly a ``cls`` instance. (``torch.nn.utils.skip_init`` does the same by drawing on the meta device first,
    which costs about 1 ms per layer in Python decompositions: most of building a small model.)
    """
    quiet = _NO_INIT.get(cls)
    if quiet is None:
        quiet = _NO_INIT[cls] = type(cls.__name__, (cls,), {"reset_parameters": lambda self: None})
    layer = quiet(*args, **kwargs)
    layer.__class__ = cls
    return layer


def linear(fan_in: int, fan_out: int, bias: bool = True, std: float = 0.02, device: Any = None, dtype: Any = None):
    """``nn.Linear`` (:class:`blockgraph.ops.fused.Linear`: oneDNN under torch.compile) with timm's ViT-family init
    (see :func:`init_linear`), drawn once: the layer is made without PyTorch's default (kaiming uniform) init, which
    would be overwritten (:func:`uninitialized`)."""
    layer = uninitialized(fused.Linear, fan_in, fan_out, bias=bias, device=device, dtype=dtype)
    return init_linear(layer, std)


def leading(x: Any, keep: int | None) -> Any:
    """The first ``keep`` tokens of ``x`` ``[B, N, C]`` (contiguous), or ``x`` itself when ``keep`` is None."""
    return x if keep is None else x[:, :keep].contiguous()


def split_qkv(qkv: Any, x: Any, heads: int, queries: int, fast: bool) -> tuple[Any, Any, Any]:
    """q from the first ``queries`` tokens of ``x`` ``[B, N, C]``, k and v from every token, through the rows of the
    ``qkv`` layer (q, then k, then v; views of its weight): ``[B, heads, queries, d]``, ``[B, heads, N, d]`` twice.
    ``fast``: through :func:`blockgraph.ops.fused.linear` (eager inference only)."""
    B, N, C = x.shape

    def project(x: Any, rows: slice) -> Any:
        if fast:
            return fused.linear(x, qkv, rows=rows)
        return F.linear(x, qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])

    q = project(x[:, :queries], slice(0, C)).view(B, queries, heads, -1).transpose(1, 2)
    k, v = project(x, slice(C, None)).view(B, N, 2, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def init_linear(layer: Any, std: float = 0.02) -> Any:
    """timm's ViT-family init: weight ~ trunc_normal(std) cut at +-2, bias zero (no-op on the meta device).

    The cut is at +-2 in absolute terms (timm's and torch's default), 100 standard deviations at std 0.02, where no
    draw ever lands: a plain normal draw then clamp is the same distribution (up to a probability of ~1e-2000) in
    one pass instead of trunc_normal_'s five (uniform, erfinv, scale, shift, clamp): most of building CoaT-Tiny.
    """
    if layer.weight.device.type != "meta" and not _init_skipped:
        if std <= 0.1:  # the cut at least 20 standard deviations out
            with torch.no_grad():
                layer.weight.normal_(0.0, std).clamp_(-2.0, 2.0)
        else:
            nn.init.trunc_normal_(layer.weight, std=std)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return layer


class DropPath(Module):
    """Stochastic depth per sample (Huang et al., "Deep Networks with Stochastic Depth", 2016), timm semantics:
    scales kept samples by ``1 / keep``; the identity at inference or with ``p == 0``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path(p: float) -> Any:
    """A :class:`DropPath`, or ``nn.Identity`` when ``p == 0`` (as timm, so module trees match)."""
    return DropPath(p) if p > 0.0 else nn.Identity()


ACTIVATIONS = {"gelu": "GELU", "relu": "ReLU", "silu": "SiLU", "hardswish": "Hardswish", "identity": "Identity"}


def activation(name: str) -> Any:
    """An activation module by its spec name (``gelu`` is the exact erf form)."""
    return getattr(nn, ACTIVATIONS[name])()
