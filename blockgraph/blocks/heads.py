"""Classification heads."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType


@register
class ClsHeadSpec(BlockSpec):
    """Norm → pool (the cls token, or the mean of the image tokens) → dropout → linear classifier
    (CoaT-Lite's and ViT's head)."""

    op: Literal["cls_head"]
    dim: PositiveInt
    """Channels of the tokens."""
    num_classes: NonNegativeInt
    """Classes; 0 gives the pooled features (no classifier)."""
    pool: Literal["token", "avg"] = "token"
    """``token``: the first (cls) token; ``avg``: the mean of the tokens after the extra ones."""
    norm: bool = True
    """A LayerNorm over the tokens before pooling."""
    norm_eps: PositiveFloat = 1e-6
    """LayerNorm epsilon."""
    drop: Rate = 0.0
    """Dropout before the classifier (training only)."""

    classifiers = ("fc",)

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        if self.pool == "token" and x.extra == 0:
            ctx.fail(
                "`pool: token` needs a cls token, but the tokens carry none",
                field="pool",
                hint="use `pool: avg`, or insert_cls_token earlier",
            )
        return TensorType.vector(self.num_classes or self.dim)

    def reads_tokens(self, x: TensorType) -> int | None:
        return 1 if self.pool == "token" else None

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.heads import ClsHead

        return ClsHead(extra=x.extra, **self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.norm(self.dim, self.norm) + (count.linear(self.dim, self.num_classes) if self.num_classes else 0)


@register
class AvgPoolHeadSpec(BlockSpec):
    """Global average pooling of a map → dropout → linear classifier (MPViT's ``Cls_head``, ResNet's head)."""

    op: Literal["avg_pool_head"]
    dim: PositiveInt
    """Channels of the map."""
    num_classes: NonNegativeInt
    """Classes; 0 gives the pooled features (no classifier)."""
    drop: Rate = 0.0
    """Dropout before the classifier (training only)."""

    classifiers = ("fc",)

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image", channels=self.dim)
        return TensorType.vector(self.num_classes or self.dim)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.heads import AvgPoolHead

        return AvgPoolHead(**self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.linear(self.dim, self.num_classes) if self.num_classes else 0
