"""Swin Transformer primitives (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021), in timm's layout: window attention with a relative position bias, cyclic-shift windows with
the -100 attention mask on alternating blocks, and patch merging at the start of stages 2-4."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate, TransformerFields
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import Constraint, TensorType

_PAD_HINT = "`pad: true` pads the map to a multiple of the window (timm's Swin with strict_img_size=False)"


@register
class SwinBlockSpec(TransformerFields):
    """Swin block on tokens ``[B, h*w, C]`` (row-major): ``x + DropPath(W-MSA(LN(x)))`` with windows of ``window``
    x ``window`` tokens, cyclically shifted by ``shift`` (0 for regular windows), then ``x + DropPath(MLP(LN(x)))``.

    The map must divide into windows: ``h % window == 0`` and ``h >= window`` (likewise ``w``), checked statically;
    with ``pad: true`` any map is padded to a multiple of the window and cropped back (timm's Swin built with
    ``strict_img_size=False``). As timm, an axis of at most one window is not shifted.
    """

    op: Literal["swin_block"]
    window: PositiveInt = 7
    """Window size in tokens per side: the map must be a multiple of it."""
    shift: NonNegativeInt = 0
    """Cyclic shift of the windows (0, or window // 2 on alternate blocks); a map of one window is not shifted."""
    attn_drop: Rate = 0.0
    """Dropout on the attention weights (training only)."""
    norm_eps: PositiveFloat = 1e-5
    pad: bool = False
    """Pad a map that does not divide into windows (zeros at the bottom and right, after the shift; the mask covers
    the shift only) and crop the result, as timm's Swin built with `strict_img_size=False`; which axes shift is then
    fixed by the map at the size the model is built for (timm fixes it at construction)."""
    needs_size = True

    no_weight_decay = (r"attn\.relative_position_bias_table",)

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim, extra=0)
        self.check_heads(ctx)
        if self.shift >= self.window:
            ctx.fail(
                f"shift {self.shift} must be smaller than the window {self.window}",
                field="shift",
                hint=f"Swin shifts every second block by half a window: `shift: {self.window // 2}` (or 0)",
            )
        sizes = () if self.pad else zip(("height", "width"), x.grid, strict=True)
        for axis, size in sizes:
            ctx.require(
                Constraint.ge(size, self.window),
                f"the map {axis} ({size}) is smaller than the window {self.window}",
                field="window",
                hint=_PAD_HINT,
            )
            ctx.require(
                Constraint.divisible(size, self.window),
                f"the map {axis} ({size}) is not divisible by the window {self.window}",
                field="window",
                hint=_PAD_HINT,
            )
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.swin import SwinBlock

        h, w = (ctx.at_input_size(size) for size in x.grid)  # the map at the spec's input: its mask is made now
        return SwinBlock(**self.fields(), size=None if h is None else (h, w), **ctx.dd)

    def params(self, x: TensorType) -> int:
        table = (2 * self.window - 1) ** 2 * self.heads  # the relative position bias
        return count.transformer_block(self.dim, int(self.dim * self.mlp_ratio), self.qkv_bias) + table


@register
class PatchMergingSpec(BlockSpec):
    """Swin's patch merging: each 2x2 group of tokens concatenated (``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
    x[1::2, 1::2]``), LayerNorm(4C), then Linear(4C, ``dim_out``, no bias); odd maps are zero-padded (timm)."""

    op: Literal["patch_merging"]
    dim: PositiveInt
    """Channels of the input tokens (the output has `dim_out`, default 2 x dim)."""
    dim_out: PositiveInt | None = None
    """Default: 2 * dim."""
    norm_eps: PositiveFloat = 1e-5
    """LayerNorm epsilon."""
    pad: bool = True
    """Zero-pad a map of odd height or width by one row or column (timm); `false` refuses such maps statically."""
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim, extra=0)
        for axis, size in () if self.pad else zip(("height", "width"), x.grid, strict=True):
            ctx.require(
                Constraint.divisible(size, 2),
                f"the map {axis} ({size}) is odd",
                field="pad",
                hint="`pad: true` pads an odd map by one row or column of zeros, as timm does",
            )
        h, w = ((size + 1) // 2 for size in x.grid)
        return TensorType.tokens(self.dim_out or 2 * self.dim, h, w)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.swin import PatchMerging

        return PatchMerging(**self.fields("dim_out", "pad"), dim_out=self.dim_out or 2 * self.dim, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.norm(4 * self.dim) + count.linear(4 * self.dim, self.dim_out or 2 * self.dim, bias=False)
