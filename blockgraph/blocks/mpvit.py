"""MPViT's multi-path primitives (Lee et al., "MPViT: Multi-Path Vision Transformer for Dense Prediction", CVPR
2022): the chained multi-scale patch embedding and the inverted-residual local path. The paths' encoders are
``serial_block`` chains (CoaT's conv-attention, here without a cls token), declared as ``paths:`` of a stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext
from blockgraph.blocks.conv import ConvAct
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType


@register
class MultiScalePatchEmbedSpec(BlockSpec):
    """``paths`` depthwise-separable Conv-BN-act embeddings, **chained**: path k embeds path k-1's output, so the
    paths see 3x3, 5x5, 7x7... receptive fields; only the first strides. Outputs ``p0``, ``p1``, ..."""

    op: Literal["multi_scale_patch_embed"]
    dim: PositiveInt
    """Channels in and out."""
    paths: PositiveInt
    """Number of chained embeddings; their outputs are ports p0, p1, ..."""
    stride: PositiveInt = 1
    """Stride of the first path's embedding (the others keep the size)."""
    kernel: PositiveInt = 3
    """Depthwise kernel of every path's embedding."""
    act: ConvAct = "hardswish"
    """Activation function."""
    bn_eps: PositiveFloat = 1e-5
    """BatchNorm epsilon."""

    batch_norm = True

    def output_ports(self) -> tuple[str, ...]:
        return tuple(f"p{k}" for k in range(self.paths))

    def infer(self, ctx: InferContext, x: TensorType) -> dict[str, TensorType]:
        ctx.expect(x, layout="image", channels=self.dim)
        grid = ctx.conv2d(x, self.kernel, self.stride, field="stride")
        return {port: TensorType.image(self.dim, *grid) for port in self.output_ports()}

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.mpvit import MultiScalePatchEmbed

        return MultiScalePatchEmbed(**self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        depthwise = count.conv(self.dim, self.dim, self.kernel, groups=self.dim, bias=False)
        return self.paths * (depthwise + count.conv_bn(self.dim, self.dim))


@register
class InvResBlockSpec(BlockSpec):
    """MPViT's local path: ``x + Conv1x1-BN(act(BN(DWConv3x3(Conv1x1-BN-act(x)))))`` (an inverted residual with
    hidden width = ``dim * expansion``)."""

    op: Literal["inv_res_block"]
    dim: PositiveInt
    """Channels of the input (and of the output)."""
    expansion: PositiveFloat = 1.0
    """Hidden width = int(dim x expansion)."""
    act: ConvAct = "hardswish"
    """Activation function."""
    bn_eps: PositiveFloat = 1e-5
    """BatchNorm epsilon."""

    batch_norm = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image", channels=self.dim)
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.mpvit import InvResBlock

        return InvResBlock(**self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.inverted_residual(self.dim, int(self.dim * self.expansion), self.dim)
