"""Deformable-DETR / DINO encoder primitives (Zhu et al., "Deformable DETR", ICLR 2021; Zhang et al., "DINO",
ICLR 2023): the multi-scale deformable encoder over several feature levels, and the per-level input projection
(conv + GroupNorm)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate
from blockgraph.blocks.conv import Conv2dFields
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType


@register
class ConvGnSpec(Conv2dFields):
    """Conv2d (with bias) → GroupNorm: the per-level input projection of Deformable-DETR and DINO (1x1 on the
    backbone levels, 3x3 stride 2 for the extra level)."""

    op: Literal["conv_gn"]
    groups: PositiveInt = 32
    """GroupNorm groups."""
    eps: PositiveFloat = 1e-5
    """GroupNorm epsilon."""

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.divides(self.dim_out, self.groups, field="groups", what="GroupNorm group", of="dim_out")
        return self.out_type(ctx, x)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.deformable import ConvGn

        return ConvGn(x.channels, **self.conv_fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.conv(x.channels, self.dim_out, self.kernel) + count.norm(self.dim_out)


@register
class DeformableEncoderSpec(BlockSpec):
    """A multi-scale deformable encoder over ``levels`` maps (DINO's 4-scale encoder by default): flatten the levels
    in order, add the sine position embedding plus a learned level embedding, run ``layers`` post-norm deformable
    layers from pixel-centre reference points, and split the memory back into maps.

    Outputs: ``memory`` (all levels' tokens) and ``l0`` ... (each level's map, the input's size).

    A padding mask of the image (a model input of ``kind: mask``) may follow the levels in ``from:``: it is resized
    to each level (nearest, as DETR does), the padded tokens are left out of every attention's values, and the
    position embedding and reference points are those of the valid region. An optional mask left out (None) means
    no padding.
    """

    op: Literal["deformable_encoder"]
    dim: PositiveInt = 256
    """Model width (d_model) of every level and of the memory."""
    levels: PositiveInt = 4
    """Feature levels (inputs) the attention samples from."""
    heads: PositiveInt = 8
    """Attention heads; they must divide `dim`."""
    points: PositiveInt = 4
    """Sampling points per head and level."""
    layers: PositiveInt = 6
    """Encoder layers."""
    ffn: PositiveInt = 2048
    """Hidden width of each layer's feed-forward network."""
    dropout: Rate = 0.0
    """Dropout after the attention and in the feed-forward network (training only)."""
    act: Literal["relu", "gelu"] = "relu"
    """Activation of the feed-forward network."""
    norm_eps: PositiveFloat = 1e-5
    """LayerNorm epsilon (post-norm)."""
    pos_temperature: tuple[PositiveFloat, PositiveFloat] = (20.0, 20.0)
    """(y, x) temperatures of the sine embedding: DINO (20, 20); Deformable-DETR (10000, 10000)."""
    pos_offset: float = 0.0
    """DINO 0.0; Deformable-DETR -0.5."""
    arity = None
    takes_masks = True

    no_weight_decay = ("level_embed",)

    def output_ports(self) -> tuple[str, ...]:
        return ("memory", *(f"l{k}" for k in range(self.levels)))

    def infer(self, ctx: InferContext, *inputs: TensorType) -> dict[str, TensorType]:
        masks = [k for k, x in enumerate(inputs) if x.layout == "mask"]
        if masks and masks != [len(inputs) - 1]:
            ctx.fail(
                "a padding mask must come last in `from:`, and only one",
                field="from",
                hint="`from: [level0, level1, ..., mask]`",
            )
        xs = inputs[:-1] if masks else inputs
        if len(xs) != self.levels:
            ctx.fail(f"{len(xs)} inputs for `levels: {self.levels}`", field="from", hint=f"set `levels: {len(xs)}`")
        ctx.divides(self.dim, self.heads, field="heads", what="head")
        for k, x in enumerate(xs):
            ctx.expect(x, layout="image", channels=self.dim, what=f"level {k}")
            ctx.positive(x.grid[0], f"level {k}'s height", field="from")
            ctx.positive(x.grid[1], f"level {k}'s width", field="from")
        memory = TensorType.multilevel(self.dim, [x.grid for x in xs])
        return {"memory": memory, **{f"l{k}": x for k, x in enumerate(xs)}}

    def build(self, ctx: BuildContext, *xs: TensorType) -> Any:
        from blockgraph.layers.deformable import DeformableEncoder

        return DeformableEncoder(**self.fields(), **ctx.dd)

    def params(self, *xs: TensorType) -> int:
        d, samples = self.dim, self.heads * self.levels * self.points
        attn = count.linear(d, 2 * samples) + count.linear(d, samples) + 2 * count.linear(d, d)
        layer = attn + 2 * count.norm(d) + count.mlp(d, self.ffn)
        return self.levels * d + self.layers * layer
