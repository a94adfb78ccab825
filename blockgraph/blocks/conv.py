"""Convolutional primitives: Conv-BN-activation, and the concatenate-then-1x1 merge of parallel paths."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType

ConvAct = Literal["identity", "hardswish", "relu", "silu", "gelu"]
ConvInit = Literal["default", "fan_out", "fan_out_groups"]


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

    def conv_fields(self) -> dict[str, Any]:
        """The fields, with ``padding`` resolved, for the module."""
        padding = (self.kernel - 1) // 2 if self.padding is None else self.padding
        return {**self.fields("padding"), "padding": padding}


class BatchNormFields(BlockSpec):
    """The fields of a block ending in a BatchNorm and an activation (not an op itself)."""

    act: ConvAct = "identity"
    """Activation function."""
    bn_eps: PositiveFloat = 1e-5
    """BatchNorm epsilon."""
    init: ConvInit = "fan_out"
    """Weight init: `fan_out` is normal(0, sqrt(2 / (k*k*out))) as MPViT's Conv2d_BN, `fan_out_groups` the same over
    out / groups, `default` PyTorch's."""

    batch_norm = True


@register
class ConvBnSpec(BatchNormFields, Conv2dFields):
    """Conv2d (no bias) → BatchNorm2d → activation (``Conv2d_BN`` in LeViT and MPViT)."""

    op: Literal["conv_bn"]
    groups: PositiveInt = 1
    """Convolution groups; they must divide the input and output channels (= channels: depthwise)."""

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        for what, value in (("input", x.channels), ("dim_out", self.dim_out)):
            if value % self.groups:
                ctx.fail(f"{what} channels {value} are not divisible by groups {self.groups}", field="groups")
        return self.out_type(ctx, x)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.conv import ConvBn

        return ConvBn(x.channels, **self.conv_fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.conv_bn(x.channels, self.dim_out, self.kernel, self.groups)


@register
class ConcatConvBnSpec(BatchNormFields):
    """Concatenate maps along channels (in ``from`` order), then a 1x1 Conv-BN-activation: how MPViT merges a
    stage's paths (``aggregate``)."""

    op: Literal["concat_conv_bn"]
    dim_out: PositiveInt
    """Output channels."""
    act: ConvAct = "hardswish"
    """Activation function."""
    arity = None

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

    def build(self, ctx: BuildContext, *xs: TensorType) -> Any:
        from blockgraph.layers.conv import ConcatConvBn

        return ConcatConvBn(sum(x.channels for x in xs), **self.fields(), **ctx.dd)

    def params(self, *xs: TensorType) -> int:
        return count.conv_bn(sum(x.channels for x in xs), self.dim_out)
