"""Token plumbing: cls-token insert/remove, and conversion between token sequences and maps.

Token order is row-major (token ``n = y * w + x``); extra tokens (cls) come first.
"""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt

from blockgraph.blocks.base import BuildContext
from blockgraph.blocks.lazy import Module, nn, torch
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType


@register
class InsertClsTokenSpec(BlockSpec):
    """Prepend a learned class token to a token sequence (ViT, CoaT)."""

    op: Literal["insert_cls_token"]
    dim: PositiveInt
    """Channels of the tokens (and of the learned token)."""

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        return x.with_(extra=x.extra + 1)

    def build(self, ctx: BuildContext, x: TensorType) -> InsertClsToken:
        return InsertClsToken(self.dim, **ctx.dd)


class InsertClsToken(Module):
    """``[B, N, C]`` → ``[B, 1 + N, C]`` with the learned ``token`` (init trunc_normal(.02)) in front."""

    def __init__(self, dim, device=None, dtype=None):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim, device=device, dtype=dtype))
        if self.token.device.type != "meta":
            nn.init.trunc_normal_(self.token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.token.expand(x.shape[0], -1, -1), x), dim=1)


@register
class RemoveClsTokenSpec(BlockSpec):
    """Drop the extra (cls) tokens at the front of a token sequence."""

    op: Literal["remove_cls_token"]

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens")
        if x.extra == 0:
            ctx.fail("the tokens carry no cls token to remove", field="op", hint="delete this block")
        return x.with_(extra=0)

    def build(self, ctx: BuildContext, x: TensorType) -> RemoveClsToken:
        return RemoveClsToken(x.extra)


class RemoveClsToken(Module):
    """``[B, extra + N, C]`` → ``[B, N, C]``."""

    def __init__(self, extra: int = 1):
        super().__init__()
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.extra :]


@register
class TokensToMapSpec(BlockSpec):
    """Reshape a token sequence ``[B, h*w, C]`` to a map ``[B, C, h, w]`` (contiguous)."""

    op: Literal["tokens_to_map"]
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", extra=0)
        return TensorType.image(x.channels, *x.grid)

    def build(self, ctx: BuildContext, x: TensorType) -> TokensToMap:
        return TokensToMap()


class TokensToMap(Module):
    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return x.reshape(x.shape[0], size[0], size[1], -1).permute(0, 3, 1, 2).contiguous()  # [B, C, h, w]


@register
class MapToTokensSpec(BlockSpec):
    """Flatten a map ``[B, C, h, w]`` to tokens ``[B, h*w, C]``."""

    op: Literal["map_to_tokens"]

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image")
        return TensorType.tokens(x.channels, *x.grid)

    def build(self, ctx: BuildContext, x: TensorType) -> MapToTokens:
        return MapToTokens()


class MapToTokens(Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # [B, h*w, C]
