"""Layers and helpers every family uses: the linear layer and its init, drop path, activations, per-size caches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import Tensor, nn

from blockgraph.ops.kernel import autocasting, training_fold
from blockgraph.ops.linear import linear as linear_op

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "identity": nn.Identity}


def activation(name: str) -> nn.Module:
    """An activation module by its spec name (``gelu`` is the exact erf form)."""
    return ACTIVATIONS[name]()


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters, state_dict and results) whose forward is :func:`blockgraph.ops.linear.linear`:
    an activation and a residual add may ride along, and the op picks its kernel (oneDNN with the activation or the
    add in its epilogue for eager inference and in graphs compiled for inference)."""

    def forward(
        self,
        x: Tensor,
        act: nn.Module | None = None,
        residual: Tensor | None = None,
        scale: Tensor | None = None,
        samples: Tensor | None = None,
    ) -> Tensor:
        """``residual + samples * scale * act(the layer(x))`` (``act``, ``residual``, ``scale``, ``samples``:
        optional; ``scale``, per output channel; ``samples``, per sample (a drop path's factors), with a residual in
        a training step; with a residual and no activation, the op's: in eager inference the scale folded into the
        weights, in eager training too, and the add one pass: :func:`blockgraph.ops.linear.linear`)."""
        if (scale is not None or samples is not None) and residual is not None and act is None:
            return linear_op(x, self.weight, self.bias, residual=residual, scale=scale, samples=samples)
        if scale is not None or samples is not None:
            y = self.forward(x, act)
            y = y if scale is None else y * scale
            y = y if samples is None else y * samples
            return y if residual is None else residual + y
        if act is not None and has_hooks(act):  # hooks see the activation run as a module of its own
            y = act(linear_op(x, self.weight, self.bias))
            return y if residual is None else residual + y
        return linear_op(x, self.weight, self.bias, act=act, residual=residual)

    def script_forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """TorchScript's (compiler/script.py): the plain reference; a caller applies the activation itself."""
        y = F.linear(x, self.weight, self.bias)
        return y if residual is None else residual + y


def has_hooks(module: nn.Module) -> bool:
    """Whether forward hooks see ``module`` run (its own, or global ones): then an activation passed to a layer
    (``act=``) runs as a call of its own, not in the layer's kernel."""
    glob = nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(glob, "_global_forward_hooks", None)
        or getattr(glob, "_global_forward_pre_hooks", None)
    )


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., "Deep Networks with Stochastic Depth", 2016), timm semantics:
    scales kept samples by ``1 / keep``; the identity at inference or with ``p == 0``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        mask = self.mask(x)
        return x if mask is None else x * mask

    def mask(self, x: Tensor) -> Tensor | None:
        """The per-sample factors the forward multiplies ``x`` by (``[B, 1, ...]``: 0 for a dropped sample,
        ``1 / keep`` for a kept one, drawn as timm draws them), or None where the forward is the identity."""
        if self.p == 0.0 or not self.training:
            return None
        keep = 1.0 - self.p
        return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def residual_branch(layer: nn.Module, x: Tensor, residual: Tensor | None, *drops: nn.Module) -> Tensor:
    """``residual + drops(layer(x))`` (no add without ``residual``): a block's branch whose last layer takes a
    ``residual`` to add (:class:`Linear`, ``ConvBn``), followed by dropout and drop path (``drops``, in order). In
    eval, where those are identities, the layer adds the residual itself (in its kernel's epilogue, or in place);
    in an eager training step without autocast, a :class:`Linear` whose drops are drop paths (dropout at 0) adds
    their per-sample factors times its output to the residual in one pass
    (:func:`~blockgraph.ops.kernel.residual_training`)."""
    if residual is not None and not layer.training:
        return layer(x, residual=residual)
    if (
        residual is not None
        and isinstance(layer, Linear)
        and training_fold(x)
        and residual.dtype == x.dtype
        and not autocasting(x.device.type)  # (as written, the drop path draws its factors in the product's dtype)
        and identities(drops)
        and not any(has_hooks(m) for m in (layer, *drops))
    ):
        samples = drop_samples(drops, residual)  # [B, 1, 1] or None
        if samples is not None:
            return layer(x, residual=residual, samples=samples)  # (the drop path's factors and the add in one pass)
    y = layer(x)
    for drop in drops:
        y = drop(y)
    return y if residual is None else residual + y


def identities(modules: Sequence[nn.Module]) -> bool:
    """Whether each module is an identity but for a drop path's per-sample factors (:meth:`DropPath.mask`): a drop
    path, dropout with ``p == 0`` or off, ``nn.Identity``."""
    return all(
        isinstance(m, DropPath | nn.Identity) or (isinstance(m, nn.Dropout) and (m.p == 0 or not m.training))
        for m in modules
    )


def drop_samples(modules: Sequence[nn.Module], like: Tensor) -> Tensor | None:
    """The product of the per-sample factors of the drop paths among ``modules`` (:func:`identities`), drawn in
    their order, for a tensor like ``like``; None when none draws any. (A training step's branch draws them before
    its layer runs, not after: the layers draw no random numbers, so the values are the same.)"""
    samples = None
    for m in modules:
        mask = m.mask(like) if isinstance(m, DropPath) else None
        if mask is not None:
            samples = mask if samples is None else samples * mask
    return samples


def qkv_heads(
    x: Tensor, w: Tensor, b: Tensor | None, heads: int, queries: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v per head from a ``qkv`` projection (weight ``w``, bias ``b``; q, k, v rows, timm's layout) of
    tokens ``x`` ``[B, N, C]``, in the token layout: ``[B, Nq, heads, d]`` and ``[B, N, heads, d]`` twice (views).
    With ``queries``, q is computed for the first ``queries`` tokens only, through views of the weight's rows; every
    token is a key and a value."""
    B, N, C = x.shape
    if queries is None:
        y = F.linear(x, w, b) if torch.jit.is_scripting() else linear_op(x, w, b)
        q, k, v = y.view(B, N, 3, heads, -1).unbind(2)
        return q, k, v
    bq = None if b is None else b[:C]
    bkv = None if b is None else b[C:]
    if torch.jit.is_scripting():
        q, kv = F.linear(x[:, :queries], w[:C], bq), F.linear(x, w[C:], bkv)
    else:
        q, kv = linear_op(x[:, :queries], w[:C], bq), linear_op(x, w[C:], bkv)
    k, v = kv.view(B, N, 2, heads, -1).unbind(2)
    return q.view(B, queries, heads, -1), k, v


def leading(x: Tensor, keep: int | None) -> Tensor:
    """The first ``keep`` tokens of ``x`` ``[B, N, C]`` (contiguous), or ``x`` itself when ``keep`` is None."""
    return x if keep is None else x[:, :keep].contiguous()


def memo(cache: dict[Any, Any], key: Any, make: Callable[[], Any], limit: int = 8) -> Any:
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


def uninitialized(cls: type[nn.Module], *args: Any, **kwargs: Any) -> Any:
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


def linear(
    fan_in: int, fan_out: int, bias: bool = True, std: float = 0.02, device: Any = None, dtype: Any = None
) -> Linear:
    """A :class:`Linear` with timm's ViT-family init (see :func:`init_linear`), drawn once: the layer is made
    without PyTorch's default (kaiming uniform) init, which would be overwritten (:func:`uninitialized`)."""
    layer: Linear = uninitialized(Linear, fan_in, fan_out, bias=bias, device=device, dtype=dtype)
    init_linear(layer, std)
    return layer


def init_linear(layer: nn.Linear, std: float = 0.02) -> nn.Linear:
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


def checkpointed(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Call ``module`` under activation checkpointing (``torch.utils.checkpoint``, non-reentrant) while gradients
    are recorded: its activations are recomputed in the backward pass instead of kept (``set_grad_checkpointing``
    makes the generated forward call each block so)."""
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return module(*args, **kwargs)
    return checkpoint(module, *args, use_reentrant=False, **kwargs)
