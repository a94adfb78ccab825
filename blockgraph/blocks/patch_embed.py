"""Convolutional patch embedding: a strided conv, flattened to tokens, then a LayerNorm (ViT, CoaT)."""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext
from blockgraph.blocks.lazy import Module, nn, torch
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

    def build(self, ctx: BuildContext, x: TensorType) -> ConvPatchEmbed:
        return ConvPatchEmbed(
            x.channels, self.dim, self.patch, self.norm, self.norm_eps, self.bias, self.flatten, **ctx.dd
        )

    def params(self, x: TensorType) -> int:
        return count.conv(x.channels, self.dim, self.patch, bias=self.bias) + count.norm(self.dim, self.norm)


class ConvPatchEmbed(Module):
    """``proj`` (Conv2d, kernel = stride = patch) → flatten to tokens → ``norm`` (timm's PatchEmbed layout)."""

    def __init__(self, in_chans, dim, patch, norm=True, eps=1e-5, bias=True, flatten=True, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch, bias=bias, **dd)
        self.norm = nn.LayerNorm(dim, eps=eps, **dd) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, C, h, w]
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return self.norm(x)
