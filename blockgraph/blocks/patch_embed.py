"""Convolutional patch embedding: a strided conv, flattened to tokens, then a LayerNorm (ViT, CoaT)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType


@register
class ConvPatchEmbedSpec(BlockSpec):
    """Split an image (or map) into ``patch x patch`` patches and project each to ``dim`` channels
    (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; CoaT uses it at every stage)."""

    op: Literal["conv_patch_embed"]
    dim: PositiveInt
    """Output channels (embedding width)."""
    patch: PositiveInt
    """Patch size: the conv's kernel and stride."""
    norm: bool = True
    """LayerNorm over the channels after flattening."""
    norm_eps: PositiveFloat = 1e-5
    """LayerNorm epsilon."""
    bias: bool = True
    """Bias on the projection conv."""
    flatten: bool = True
    """Output tokens ``[B, N, dim]``; with ``false``, the map ``[B, dim, H/p, W/p]`` (no norm allowed)."""

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image")
        if self.norm and not self.flatten:
            ctx.fail("a LayerNorm over channels needs `flatten: true`", field="norm", hint="set `norm: false`")
        h, w = ctx.conv2d(x, self.patch, self.patch, 0, field="patch")
        if self.flatten:
            return TensorType.tokens(self.dim, h, w)
        return TensorType.image(self.dim, h, w)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.patch_embed import ConvPatchEmbed

        return ConvPatchEmbed(x.channels, **self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.conv(x.channels, self.dim, self.patch, bias=self.bias) + count.norm(self.dim, self.norm)
