"""Token plumbing: cls-token insert/remove, and conversion between token sequences and maps.

Token order is row-major (token ``n = y * w + x``); extra tokens (cls) come first.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import NonNegativeFloat, NonNegativeInt, PositiveInt

from blockgraph.blocks.base import BuildContext
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType


@register
class InsertClsTokenSpec(BlockSpec):
    """Insert a learned token (a class token; DeiT's distillation token) into a token sequence (ViT, CoaT)."""

    op: Literal["insert_cls_token"]
    dim: PositiveInt
    """Channels of the tokens (and of the learned token)."""
    at: NonNegativeInt = 0
    """Where the token goes among the extra tokens: 0 = first (cls); 1 = after the cls token (DeiT's dist token)."""
    init_std: NonNegativeFloat = 0.02
    """Init: trunc_normal(std) (timm ViT: 1e-6 for cls, CoaT: 0.02)."""

    no_weight_decay = ("token",)

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        if self.at > x.extra:
            ctx.fail(f"`at: {self.at}` is past the {x.extra} extra token(s) already there", field="at")
        return x.with_(extra=x.extra + 1)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.tokens import InsertClsToken

        return InsertClsToken(**self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return self.dim


@register
class RemoveClsTokenSpec(BlockSpec):
    """Drop the extra (cls) tokens at the front of a token sequence."""

    op: Literal["remove_cls_token"]

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens")
        if x.extra == 0:
            ctx.fail("the tokens carry no cls token to remove", field="op", hint="delete this block")
        return x.with_(extra=0)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.tokens import RemoveClsToken

        return RemoveClsToken(x.extra)

    def params(self, x: TensorType) -> int:
        return 0


@register
class TokensToMapSpec(BlockSpec):
    """Reshape a token sequence ``[B, h*w, C]`` to a map ``[B, C, h, w]`` (contiguous)."""

    op: Literal["tokens_to_map"]
    drop_extra: bool = False
    """Drop the extra (cls) tokens first; without it, tokens that carry them are an error."""
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", extra=None if self.drop_extra else 0)
        return TensorType.image(x.channels, *x.grid)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.tokens import TokensToMap

        return TokensToMap(x.extra if self.drop_extra else 0)

    def params(self, x: TensorType) -> int:
        return 0


@register
class MapToTokensSpec(BlockSpec):
    """Flatten a map ``[B, C, h, w]`` to tokens ``[B, h*w, C]``."""

    op: Literal["map_to_tokens"]

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image")
        return TensorType.tokens(x.channels, *x.grid)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.tokens import MapToTokens

        return MapToTokens()

    def params(self, x: TensorType) -> int:
        return 0
