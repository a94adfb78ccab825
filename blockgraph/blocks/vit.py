"""Vision Transformer primitives (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021) and DeiT's
distillation head (Touvron et al., "Training data-efficient image transformers", ICML 2021)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate, TransformerFields
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import Constraint, TensorType


@register
class PosEmbedSpec(BlockSpec):
    """Learned absolute position embedding added to the tokens; the extra (cls, dist) tokens have rows of their own.

    The embedding covers a fixed token ``grid``: other input sizes are rejected statically, unless ``resample`` names
    an interpolation, in which case the grid part is resized to the input's grid in ``forward`` (timm's
    ``resample_abs_pos_embed``).
    """

    op: Literal["pos_embed"]
    dim: PositiveInt
    """Channels of the input (and of the output)."""
    grid: tuple[PositiveInt, PositiveInt]
    """The token grid (h, w) the embedding was made for (14 x 14 for a 224 input with patch 16)."""
    resample: Literal[False, "bilinear", "bicubic"] = False
    """``false``: only the spec's grid is accepted; otherwise interpolate the embedding to other grids."""
    init_std: PositiveFloat = 0.02
    """Init: trunc_normal(std)."""
    needs_size = True

    no_weight_decay = ("weight",)

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        if not self.resample:
            gh, gw = self.grid
            stride = x.stride()
            native = f" (input {gh * stride}x{gw * stride})" if stride else ""
            for axis, (size, want) in enumerate(zip(x.grid, self.grid, strict=True)):
                ctx.require(
                    Constraint.eq(size, want),
                    f"the position embedding covers a {gh}x{gw} token grid{native}, but the "
                    f"{'height' if axis == 0 else 'width'} gives {size} tokens",
                    field="grid",
                    hint="set `resample: bicubic` on this block to interpolate the embedding to other sizes",
                )
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.vit import PosEmbed

        return PosEmbed(extra=x.extra, **self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return (x.extra + self.grid[0] * self.grid[1]) * self.dim


@register
class VitBlockSpec(TransformerFields):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``; softmax
    attention through ``F.scaled_dot_product_attention``."""

    op: Literal["vit_block"]
    attn_drop: Rate = 0.0
    """Dropout on the attention weights (training only)."""
    trims_tokens = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        self.check_heads(ctx)
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.vit import VitBlock

        return VitBlock(**self.fields(), keep=ctx.keep_tokens, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.transformer_block(self.dim, int(self.dim * self.mlp_ratio), self.qkv_bias)


@register
class DistilledHeadSpec(BlockSpec):
    """DeiT's distilled head: norm, then ``fc`` on the cls token and ``fc_dist`` on the distillation token.

    In eval it returns their average; in training with ``train_both`` it returns the pair ``(cls, dist)`` (each of
    the static type), for the distillation loss.
    """

    op: Literal["distilled_head"]
    dim: PositiveInt
    """Channels of the tokens."""
    num_classes: NonNegativeInt
    """Classes; 0 gives the pooled features (no classifier)."""
    norm_eps: PositiveFloat = 1e-6
    """LayerNorm epsilon."""
    drop: Rate = 0.0
    """Dropout before the classifier (training only)."""
    train_both: bool = True
    """In training, return (cls logits, dist logits) for the distillation loss; in eval, their average."""

    classifiers = ("fc", "fc_dist")

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        if x.extra < 2:
            ctx.fail(
                f"a distilled head reads the cls and dist tokens, but the tokens carry {x.extra} extra token(s)",
                field="from",
                hint="insert the dist token with `op: insert_cls_token, at: 1`",
            )
        return TensorType.vector(self.num_classes or self.dim)

    def reads_tokens(self, x: TensorType) -> int:
        return 2  # cls and dist

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.vit import DistilledHead

        return DistilledHead(**self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.norm(self.dim) + (2 * count.linear(self.dim, self.num_classes) if self.num_classes else 0)
