"""Token plumbing: cls-token insert/remove, and conversion between token sequences and maps.

Token order is row-major (token ``n = y * w + x``); extra tokens (cls) come first.
"""

from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat, NonNegativeInt, PositiveInt

from blockgraph.blocks.base import BuildContext
from blockgraph.blocks.lazy import Module, nn, torch
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

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        if self.at > x.extra:
            ctx.fail(f"`at: {self.at}` is past the {x.extra} extra token(s) already there", field="at")
        return x.with_(extra=x.extra + 1)

    def build(self, ctx: BuildContext, x: TensorType) -> InsertClsToken:
        return InsertClsToken(self.dim, self.at, self.init_std, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return self.dim


class InsertClsToken(Module):
    """``[B, N, C]`` → ``[B, 1 + N, C]`` with the learned ``token`` at position ``at``."""

    def __init__(self, dim, at=0, init_std=0.02, device=None, dtype=None):
        super().__init__()
        self.at = at
        self.token = nn.Parameter(torch.zeros(1, 1, dim, device=device, dtype=dtype))
        if self.token.device.type != "meta" and init_std > 0:
            nn.init.trunc_normal_(self.token, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token = self.token.expand(x.shape[0], -1, -1)
        if self.at == 0:
            return torch.cat((token, x), dim=1)
        return torch.cat((x[:, : self.at], token, x[:, self.at :]), dim=1)


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

    def params(self, x: TensorType) -> int:
        return 0


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
    drop_extra: bool = False
    """Drop the extra (cls) tokens first; without it, tokens that carry them are an error."""
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", extra=None if self.drop_extra else 0)
        return TensorType.image(x.channels, *x.grid)

    def build(self, ctx: BuildContext, x: TensorType) -> TokensToMap:
        return TokensToMap(x.extra if self.drop_extra else 0)

    def params(self, x: TensorType) -> int:
        return 0


class TokensToMap(Module):
    def __init__(self, extra: int = 0):
        super().__init__()
        self.extra = extra

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.extra:
            x = x[:, self.extra :]
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

    def params(self, x: TensorType) -> int:
        return 0


class MapToTokens(Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # [B, h*w, C]
