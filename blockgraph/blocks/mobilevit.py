"""MobileViT primitives (Mehta & Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision
Transformer", ICLR 2022), in timm's ByobNet layout: the MV2 inverted residual and the MobileViT block (local conv,
unfold into 2x2-patch sequences, transformer, fold, fuse with the input by concatenation)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate
from blockgraph.blocks.conv import ConvAct
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import Constraint, TensorType


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's ``make_divisible``: round to the nearest multiple of ``divisor``, never below 90% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


@register
class Mv2BlockSpec(BlockSpec):
    """MobileNetV2's inverted residual (MV2): 1x1 expand (BN, act) → 3x3 depthwise with the stride (BN, act) → 1x1
    project (BN, no act); the input is added back only when the shapes allow (``stride 1`` and ``dim == dim_out``).
    The hidden width is ``make_divisible(input channels * expansion, 8)``."""

    op: Literal["mv2_block"]
    dim_out: PositiveInt
    """Output channels."""
    stride: Literal[1, 2] = 1
    """1 or 2 (the depthwise conv's); the residual is used only at stride 1 with equal widths."""
    expansion: PositiveFloat = 4.0
    """Hidden width = make_divisible(input channels x expansion, 8)."""
    act: ConvAct = "silu"
    """Activation function."""
    drop_path: Rate = 0.0
    """Stochastic-depth rate of the residual branches (0: off)."""

    batch_norm = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image")
        return TensorType.image(self.dim_out, *ctx.conv2d(x, 3, self.stride, field="stride"))

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.mobilevit import Mv2Block

        hidden = make_divisible(x.channels * self.expansion)
        return Mv2Block(x.channels, hidden=hidden, **self.fields("expansion"), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.inverted_residual(x.channels, make_divisible(x.channels * self.expansion), self.dim_out)


@register
class MobileVitBlockSpec(BlockSpec):
    """MobileViT block: 3x3 conv (BN, act) → 1x1 to ``transformer_dim`` → unfold into ``patch x patch`` positions,
    each a sequence over the patches → ``layers`` pre-norm transformer layers → LayerNorm → fold → 1x1 back (BN,
    act) → concatenate with the block's input → 3x3 fusion (BN, act). No residual around the block.

    A map that does not divide into patches is resized (bilinear) up to the next multiple of the patch for the
    transformer, and the result back, as timm does (``interpolate: false``: such a map is refused statically)."""

    op: Literal["mobilevit_block"]
    dim: PositiveInt
    """Channels of the input (and of the output)."""
    transformer_dim: PositiveInt
    """Width of the transformer that runs on the unfolded patches."""
    layers: PositiveInt = 2
    """Transformer layers (``depth`` would repeat the whole block)."""
    heads: PositiveInt = 4
    """Attention heads; they must divide `transformer_dim`."""
    patch: PositiveInt = 2
    """Unfold patch size: the map must be a multiple of it on both sides."""
    mlp_ratio: PositiveFloat = 2.0
    """Transformer MLP hidden width = int(transformer_dim * mlp_ratio)."""
    act: ConvAct = "silu"
    """Activation function."""
    norm_eps: PositiveFloat = 1e-5
    """LayerNorm epsilon."""
    drop_path: Rate = 0.0
    """Stochastic-depth rate of the residual branches (0: off)."""
    interpolate: bool = True
    """Resize a map that does not divide into patches up to the next multiple of the patch, and back (timm); false:
    the map must divide into patches."""
    batch_norm = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image", channels=self.dim)
        ctx.divides(self.transformer_dim, self.heads, field="heads", what="head", of="transformer_dim")
        for axis, size in zip(("height", "width"), x.grid, strict=True):
            if not self.interpolate:
                ctx.require(
                    Constraint.divisible(size, self.patch),
                    f"the map {axis} ({size}) is not divisible by the patch {self.patch}",
                    field="patch",
                    hint="or set `interpolate: true` to resize the map to a multiple of the patch (timm)",
                )
            ctx.positive(size, f"the map {axis}", field="patch")
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.mobilevit import MobileVitBlock

        return MobileVitBlock(**self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        d, t = self.dim, self.transformer_dim
        layers = self.layers * count.transformer_block(t, int(t * self.mlp_ratio))
        return (
            count.conv_bn(d, d, 3) + count.conv(d, t, 1, bias=False) + layers + count.norm(t) + count.conv_bn(t, d)
            + count.conv_bn(2 * d, d, 3)
        )  # fmt: skip
