"""Convolutional primitives: Conv-BN-activation, and the concatenate-then-1x1 merge of parallel paths."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, activation, uninitialized
from blockgraph.blocks.lazy import Module, fused, nn, torch
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType

ConvAct = Literal["identity", "hardswish", "relu", "silu", "gelu"]
ConvInit = Literal["default", "fan_out", "fan_out_groups"]


def init_conv(conv, mode: str) -> None:
    """``fan_out``: normal(0, sqrt(2 / (k*k*out))) as MPViT's Conv2d_BN (no division by groups);
    ``fan_out_groups``: the same over ``out / groups`` (MPViT's ResBlock); ``default``: PyTorch's. A bias, if any,
    is zeroed (timm's ``_init_weights`` for these layers)."""
    if mode == "default" or conv.weight.device.type == "meta":
        return
    k = conv.kernel_size[0] * conv.kernel_size[1]
    fan_out = k * conv.out_channels / (conv.groups if mode == "fan_out_groups" else 1)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def conv2d(*args, init: str = "default", **kwargs):
    """``nn.Conv2d(*args, **kwargs)`` with the weight init ``init`` (:func:`init_conv`), drawn once."""
    if init == "default":
        return nn.Conv2d(*args, **kwargs)
    conv = uninitialized(nn.Conv2d, *args, **kwargs)
    init_conv(conv, init)
    return conv


class Conv2dFields(BlockSpec):
    """The fields of a square 2-d convolution, shared by conv-then-norm blocks (not an op itself)."""

    dim_out: PositiveInt
    """Output channels."""
    kernel: PositiveInt = 1
    """Square kernel size."""
    stride: PositiveInt = 1
    """Stride of the convolution (the map shrinks by about this factor)."""
    padding: NonNegativeInt | None = None
    """Default: ``(kernel - 1) // 2``."""

    def out_type(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image")
        return TensorType.image(self.dim_out, *ctx.conv2d(x, self.kernel, self.stride, self.padding, field="kernel"))

    @property
    def pad(self) -> int:
        return (self.kernel - 1) // 2 if self.padding is None else self.padding


@register
class ConvBnSpec(Conv2dFields):
    """Conv2d (no bias) → BatchNorm2d → activation (``Conv2d_BN`` in LeViT and MPViT)."""

    op: Literal["conv_bn"]
    groups: PositiveInt = 1
    """Convolution groups; they must divide the input and output channels (= channels: depthwise)."""
    act: ConvAct = "identity"
    """Activation function."""
    bn_eps: PositiveFloat = 1e-5
    """BatchNorm epsilon."""
    init: ConvInit = "fan_out"
    """Weight init: `fan_out` is normal(0, sqrt(2 / (k*k*out))) as MPViT's Conv2d_BN, `fan_out_groups` the same over
    out / groups, `default` PyTorch's."""

    batch_norm = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        for what, value in (("input", x.channels), ("dim_out", self.dim_out)):
            if value % self.groups:
                ctx.fail(f"{what} channels {value} are not divisible by groups {self.groups}", field="groups")
        return self.out_type(ctx, x)

    def build(self, ctx: BuildContext, x: TensorType) -> ConvBn:
        return ConvBn(
            x.channels, self.dim_out, self.kernel, self.stride, self.pad, self.groups, self.act, self.bn_eps, self.init,
            **ctx.dd,
        )  # fmt: skip

    def params(self, x: TensorType) -> int:
        return count.conv_bn(x.channels, self.dim_out, self.kernel, self.groups)


class ConvBn(Module):
    """``conv`` → ``bn`` → ``act``."""

    def __init__(
        self, dim, dim_out, kernel=1, stride=1, padding=0, groups=1, act="identity", eps=1e-5, init="fan_out",
        device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = conv2d(dim, dim_out, kernel, stride, padding, groups=groups, bias=False, init=init, **dd)
        self.bn = nn.BatchNorm2d(dim_out, eps=eps, **dd)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(self):  # one convolution with the BatchNorm folded in
            return fused.conv_bn(x, self.conv, self.bn, self.act)
        return self.act(self.bn(self.conv(x)))


@register
class ConcatConvBnSpec(BlockSpec):
    """Concatenate maps along channels (in ``from`` order), then a 1x1 Conv-BN-activation: how MPViT merges a
    stage's paths (``aggregate``)."""

    op: Literal["concat_conv_bn"]
    dim_out: PositiveInt
    """Output channels."""
    act: ConvAct = "hardswish"
    """Activation function."""
    bn_eps: PositiveFloat = 1e-5
    """BatchNorm epsilon."""
    init: ConvInit = "fan_out"
    """Weight init: `fan_out` is normal(0, sqrt(2 / (k*k*out))) as MPViT's Conv2d_BN, `fan_out_groups` the same over
    out / groups, `default` PyTorch's."""
    arity = None

    batch_norm = True

    def infer(self, ctx: InferContext, *xs: TensorType) -> TensorType:
        for k, x in enumerate(xs):
            ctx.expect(x, layout="image", what=f"input {k}")
        grids = {x.grid for x in xs}
        if len(grids) > 1:
            listed = ", ".join(f"{x.grid[0]} x {x.grid[1]}" for x in xs)
            ctx.fail(
                f"cannot concatenate maps of different sizes ({listed})",
                field="from",
                hint="every path of a stage must keep one map size (strides and paddings alike)",
            )
        return TensorType.image(self.dim_out, *xs[0].grid)

    def build(self, ctx: BuildContext, *xs: TensorType) -> ConcatConvBn:
        total = sum(x.channels for x in xs)
        return ConcatConvBn(total, self.dim_out, self.act, self.bn_eps, self.init, **ctx.dd)

    def params(self, *xs: TensorType) -> int:
        return count.conv_bn(sum(x.channels for x in xs), self.dim_out)


class ConcatConvBn(ConvBn):
    """``torch.cat(inputs, dim=1)`` → ``conv`` (1x1) → ``bn`` → ``act``."""

    def __init__(self, dim, dim_out, act="hardswish", eps=1e-5, init="fan_out", device=None, dtype=None):
        super().__init__(dim, dim_out, 1, 1, 0, 1, act, eps, init, device=device, dtype=dtype)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cat(xs, dim=1))
