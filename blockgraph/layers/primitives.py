"""The primitive ops' modules: single torch layers with timm's semantics and parameter names, and the joints
(add, sub, mul, concat, split) that combine tensors.

Channels are dim 1 of an image map ``[B, C, h, w]`` and the last dim of tokens ``[B, N, C]`` and vectors
``[B, C]``; a layer over channels is given the input's ``layout`` and decides at construction how it reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import Tensor, nn

from blockgraph.layers.common import (
    ACTIVATIONS,
    DropPath,
    Linear,
    drop_samples,
    has_hooks,
    identities,
    init_linear,
    uninitialized,
)
from blockgraph.ops.conv import conv2d, depthwise_conv2d
from blockgraph.ops.kernel import autocasting, compiled_inference, eager_inference, symbolic_tracing, training_fold


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` built with the spec's argument names (``weight`` ``[dim_out, dim / groups, kh, kw]``, ``bias``)."""

    def __init__(
        self, dim: int, dim_out: int, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True,
        device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__(dim, dim_out, kernel, stride, padding, dilation, groups, bias, device=device, dtype=dtype)

    def forward(
        self,
        x: Tensor,
        act: nn.Module | None = None,
        residual: Tensor | None = None,
        scale: Tensor | None = None,
        samples: Tensor | None = None,
    ) -> Tensor:
        """The convolution, then ``act`` if given (the compiler passes the activation that alone reads this node);
        or ``residual + samples * scale * the convolution`` given a ``residual`` (``scale``, per channel, and
        ``samples``, per sample in a training step, optional: :func:`residual_add`).

        In training (autograd recording; eager or compiled), a depthwise convolution (stride 1, zero padding) runs
        :func:`~blockgraph.ops.conv.depthwise_conv2d`, whose backward is faster than torch's; otherwise (zero
        padding) :func:`~blockgraph.ops.conv.conv2d` (in eager inference, oneDNN's convolution on its packed weight
        with the activation in its epilogue, where that measured faster); with other padding ``nn.Conv2d``'s forward.
        An activation with hooks runs as a module of its own.
        (TorchScript compiles :meth:`script_forward` instead: compiler/script.py.)"""
        if act is not None and has_hooks(act):
            return act(self.forward(x))
        if residual is not None:
            if act is None and self.padding_mode == "zeros" and not isinstance(self.padding, str):
                stride, padding, dilation = self.stride, self.padding, self.dilation
                return conv2d(x, self.weight, self.bias, (stride[0], stride[1]), (padding[0], padding[1]),
                              (dilation[0], dilation[1]), self.groups, residual=residual, scale=scale,
                              samples=samples)  # fmt: skip
            y = self.forward(x, act)
            y = y if scale is None else y * scale.view(1, -1, 1, 1)
            return residual + (y if samples is None else y * samples)
        if (
            torch.is_grad_enabled()
            and not symbolic_tracing()
            and self.groups == self.in_channels == self.out_channels
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        ):
            y = depthwise_conv2d(x, self.weight, self.bias, (self.padding[0], self.padding[1]))
            return y if act is None else act(y)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            y = self._conv_forward(x, self.weight, self.bias)
            return y if act is None else act(y)
        stride, padding, dilation = self.stride, self.padding, self.dilation
        return conv2d(x, self.weight, self.bias, (stride[0], stride[1]), (padding[0], padding[1]),
                      (dilation[0], dilation[1]), self.groups, act)  # fmt: skip

    def script_forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class Linear2d(Linear):
    """:class:`~blockgraph.layers.common.Linear` over the channels of a map ``[B, C, h, w]``: permuted to
    channels-last ``[B, h, w, C]``, projected, permuted back (an NCHW tensor in channels-last memory)."""

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        act: nn.Module | None = None,
        residual: Tensor | None = None,
        scale: Tensor | None = None,
        samples: Tensor | None = None,
    ) -> Tensor:
        r = None if residual is None else residual.permute(0, 2, 3, 1)
        s = None if samples is None else samples.permute(0, 2, 3, 1)
        return super().forward(x.permute(0, 2, 3, 1), act, r, scale, s).permute(0, 3, 1, 2)

    def script_forward(self, x: Tensor) -> Tensor:
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


def linear(
    dim: int, dim_out: int, bias: bool = True, layout: str = "tokens", device: Any = None, dtype: Any = None
) -> Linear:
    """A linear map of the channels of ``layout`` (:class:`Linear2d` on an image map), weight ~ trunc_normal(0.02),
    bias zero (timm's init)."""
    cls = Linear2d if layout == "image" else Linear
    layer: Linear = uninitialized(cls, dim, dim_out, bias=bias, device=device, dtype=dtype)
    return init_linear(layer)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------- norms


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a map ``[B, C, h, w]`` (timm's ``LayerNorm2d``): permuted to channels-last,
    normalized, permuted back. The values do not depend on the input's memory format (NCHW or channels-last)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # [B, h, w, C]
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class RmsNorm2d(nn.RMSNorm):
    """RMSNorm over the channels of a map ``[B, C, h, w]`` (timm's ``RmsNorm2d``): permuted to channels-last,
    normalized, permuted back. The values do not depend on the input's memory format."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1).contiguous()  # [B, h, w, C]; reduced in one order whatever the input's format
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps).permute(0, 3, 1, 2)


def norm(
    kind: str, dim: int, layout: str, eps: float = 1e-5, groups: int = 1, affine: bool = True, device: Any = None,
    dtype: Any = None,
) -> nn.Module:  # fmt: skip
    """The normalization ``kind`` (layer, batch, group, rms) over the ``dim`` channels of ``layout``."""
    dd = {"device": device, "dtype": dtype}
    image = layout == "image"
    if kind == "layer":
        return (LayerNorm2d if image else nn.LayerNorm)(dim, eps=eps, elementwise_affine=affine, **dd)
    if kind == "batch":
        return (nn.BatchNorm2d if image else nn.BatchNorm1d)(dim, eps=eps, affine=affine, **dd)
    if kind == "group":
        return nn.GroupNorm(groups, dim, eps=eps, affine=affine, **dd)
    if kind == "rms":
        return (RmsNorm2d if image else nn.RMSNorm)(dim, eps=eps, elementwise_affine=affine, **dd)
    raise ValueError(f"unknown norm kind {kind!r}")


# ----------------------------------------------------------------------------------------------------- activations


class StarReLU(nn.Module):
    """``scale * relu(x) ** 2 + bias`` with learned scalars ``scale`` and ``bias`` (MetaFormer's StarReLU, timm's
    parameter names and shapes)."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0, device: Any = None, dtype: Any = None):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), scale, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.full((1,), bias, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.relu(x) ** 2 + self.bias


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    **ACTIVATIONS,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu6": nn.ReLU6,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def act(kind: str, device: Any = None, dtype: Any = None) -> nn.Module:
    """The activation ``kind`` as a module (``gelu``: the exact erf form)."""
    if kind == "star_relu":
        return StarReLU(device=device, dtype=dtype)
    return _ACTIVATIONS[kind]()


# --------------------------------------------------------------------------------------------------------- pooling


class GlobalPool(nn.Module):
    """Average or max over every position: a map ``[B, C, h, w]`` (adaptive pooling to 1x1, then flatten: timm's
    ``SelectAdaptivePool2d``) or tokens ``[B, N, C]`` (over the tokens) → ``[B, C]``."""

    def __init__(self, kind: str = "avg", layout: str = "image"):
        super().__init__()
        self.kind = kind
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "image":
            pooled = F.adaptive_avg_pool2d(x, 1) if self.kind == "avg" else F.adaptive_max_pool2d(x, 1)
            return pooled.flatten(1)
        return x.mean(dim=1) if self.kind == "avg" else x.amax(dim=1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, layout={self.layout!r}"


def pool(
    kind: str = "avg", layout: str = "image", kernel: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None, padding: tuple[int, int] = (0, 0), ceil_mode: bool = False,
    count_include_pad: bool = True, global_: bool = False,
) -> nn.Module:  # fmt: skip
    """``nn.AvgPool2d``/``nn.MaxPool2d`` of a map, or with ``global_`` a :class:`GlobalPool`."""
    if global_:
        return GlobalPool(kind, layout)
    assert kernel is not None, "a window pooling has a kernel"
    if kind == "avg":
        return nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    return nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)


def upsample(
    mode: str = "nearest", scale: int | None = None, size: tuple[int, int] | None = None, align_corners: bool = False
) -> nn.Upsample:
    """``nn.Upsample`` by ``scale`` or to ``size`` (``align_corners`` for bilinear only, as torch wants)."""
    return nn.Upsample(
        size=size, scale_factor=scale, mode=mode, align_corners=align_corners if mode == "bilinear" else None
    )


# ----------------------------------------------------------------------------------------------------- layer scale


class LayerScale(nn.Module):
    """A learned per-channel scale ``gamma`` of the last dim (tokens, vectors): timm's ``LayerScale``."""

    def __init__(self, dim: int, init: float = 1e-5, device: Any = None, dtype: Any = None):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class LayerScale2d(LayerScale):
    """A learned per-channel scale ``gamma`` of a map ``[B, C, h, w]``: timm's ``LayerScale2d``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


def layer_scale(dim: int, layout: str, init: float = 1e-5, device: Any = None, dtype: Any = None) -> LayerScale:
    """:class:`LayerScale2d` for a map, else :class:`LayerScale`."""
    return (LayerScale2d if layout == "image" else LayerScale)(dim, init, device=device, dtype=dtype)


def residual_add(
    layer: nn.Module, x: Tensor, residual: Tensor, branch: Sequence[nn.Module], add: nn.Module, first: bool = True
) -> Tensor:
    """``add(branch(layer(x)), residual)`` (``add(residual, branch(...))`` when not ``first``): a residual branch
    that ends in a layer taking a residual (:class:`Conv2d`, :class:`~blockgraph.layers.common.Linear`), then only
    ``branch``'s modules, in order (layer scales, dropout, drop path), then the add of two tensors of one type (the
    compiler calls it so: :func:`blockgraph.compiler.codegen.fused_residuals`).

    In eager inference, when every module is in eval and no hooks would see their calls, the layer computes it
    alone: ``residual + scale * layer(x)``, ``scale`` the branch's layer scale if any (dropout and drop path are
    identities in eval), the add in its kernel's epilogue and the scale folded into its weights (or the add in
    place); the same values up to float rounding. So does a graph torch.compile traces for inference (the layer's op
    then calls that eager path, or runs the scale and add as written for inductor to fuse). In an eager training
    step (:func:`~blockgraph.ops.kernel.training_fold`) likewise, the drop paths' per-sample factors drawn first
    (:func:`~blockgraph.layers.common.drop_samples`): the layer folds the scale into its weights and adds
    ``samples * y`` to the residual in one pass (:func:`~blockgraph.ops.kernel.residual_training`), where the modules
    as written make three passes forward and reduce the scale's gradient over every position. Otherwise (tracing,
    exporting, compiling for training, autocast, hooks, two layer scales, active dropout, a module of another kind)
    each module runs as written."""
    scales = [m for m in branch if isinstance(m, LayerScale)]
    if (
        training_fold(x)
        and layer.training
        and residual.dtype == x.dtype
        and not autocasting(x.device.type)
        and len(scales) <= 1
        and identities([m for m in branch if not isinstance(m, LayerScale)])
        and not any(has_hooks(m) for m in (layer, *branch, add))
    ):
        samples = drop_samples(branch, residual)
        if scales or samples is not None:
            return layer(x, residual=residual, scale=scales[0].gamma if scales else None, samples=samples)
    if (
        (eager_inference(x) or compiled_inference())
        and residual.dtype == x.dtype
        and not autocasting(x.device.type)  # (the unfused branch promotes to the scale's dtype)
        and len(scales) <= 1  # (one scale's fold is kept with the weight; a product would be folded every call)
        and all(isinstance(m, LayerScale | DropPath | nn.Dropout) for m in branch)
        and not any(m.training or has_hooks(m) for m in (layer, *branch, add))
    ):
        return layer(x, residual=residual, scale=scales[0].gamma if scales else None)
    y = layer(x)
    for m in branch:
        y = m(y)
    return add(y, residual) if first else add(residual, y)


# ---------------------------------------------------------------------------------------------------------- joints


class Elementwise(nn.Module):
    """Combines its inputs elementwise, in order, a vector ``[B, C]`` among maps or tokens broadcast over their
    positions (``[B, C, 1, 1]`` or ``[B, 1, C]``)."""

    def __init__(self, layouts: Sequence[str]):
        super().__init__()
        full = next((layout for layout in layouts if layout != "vector"), "vector")
        # per input: the layout a vector is broadcast onto, or "" for an input taken as it is
        self.lift = [full if layout == "vector" and full != "vector" else "" for layout in layouts]

    script_packs_inputs = True
    """TorchScript takes no ``*xs``: the script view passes the inputs as one list (compiler/script.py)."""

    def combine(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, *xs: Tensor) -> Tensor:
        return self.script_forward(list(xs))

    def script_forward(self, xs: list[Tensor]) -> Tensor:
        out = _lift(xs[0], self.lift[0])
        for i in range(1, len(xs)):
            out = self.combine(out, _lift(xs[i], self.lift[i]))
        return out


def _lift(x: Tensor, onto: str) -> Tensor:
    if onto == "image":
        return x[:, :, None, None]  # [B, C, 1, 1]
    if onto == "tokens":
        return x[:, None, :]  # [B, 1, C]
    return x


class Add(Elementwise):
    """``x0 + x1 + ...``."""

    def combine(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class Sub(Elementwise):
    """``x0 - x1``."""

    def combine(self, a: Tensor, b: Tensor) -> Tensor:
        return a - b


class Mul(Elementwise):
    """``x0 * x1 * ...``."""

    def combine(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b


class Concat(nn.Module):
    """``torch.cat(inputs, dim)``: along channels (dim 1 of a map, the last of tokens and vectors)."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    script_packs_inputs = True

    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=self.dim)

    def script_forward(self, xs: list[Tensor]) -> Tensor:
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Split(nn.Module):
    """``torch.split(x, sizes, dim)``: consecutive groups of channels, as a tuple (views of ``x``): one autograd node,
    whose backward concatenates the parts' gradients (one ``narrow`` per part would zero-fill a tensor of ``x``'s
    size for each part and add them). Under ``torch.fx``'s symbolic trace one ``narrow`` per part, so that the graph
    has a tuple of that many values."""

    def __init__(self, sizes: Sequence[int], dim: int = 1):
        super().__init__()
        self.sizes = list(sizes)
        self.dim = dim
        self.starts = [sum(self.sizes[:k]) for k in range(len(self.sizes))]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if symbolic_tracing():
            return tuple(x.narrow(self.dim, start, size) for start, size in zip(self.starts, self.sizes, strict=True))
        return torch.split(x, self.sizes, self.dim)

    def script_forward(self, x: Tensor) -> list[Tensor]:
        return [x.narrow(self.dim, self.starts[i], self.sizes[i]) for i in range(len(self.sizes))]

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, dim={self.dim}"
