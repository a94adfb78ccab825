"""Multi-head self-attention as a primitive (Vaswani et al., "Attention Is All You Need", NeurIPS 2017), in ViT's
layout (Dosovitskiy et al., ICLR 2021) or PVT-v2's, with keys and values reduced on the token map (Wang et al., "PVT
v2: Improved Baselines with Pyramid Vision Transformer", CVMJ 2022)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import AttentionFields, BuildContext, Rate
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import register
from blockgraph.types import TensorType


@register
class AttentionSpec(AttentionFields):
    """Multi-head self-attention on tokens ``[B, N, C]`` → the same tokens: softmax(q kᵀ / sqrt(d)) v per head
    (``F.scaled_dot_product_attention``), then the output projection ``proj``. It is the attention branch alone:
    the norm before it and the residual add are blocks of their own.

    State_dict keys as timm's: ``qkv: fused`` gives ``qkv`` and ``proj`` (timm's ``Attention``, ViT's
    ``attn``); ``qkv: split`` gives ``q``, ``kv`` and ``proj`` (``pvt_v2.Attention``), plus ``sr`` and ``norm``
    with ``sr_ratio > 1`` or ``kv_pool``, and ``q_norm``, ``k_norm`` with ``qk_norm``. Reducing keys and values
    needs the token map: tokens with no extra (cls) token.
    """

    op: Literal["attention"]
    attn_drop: Rate = 0.0
    """Dropout on the attention weights (training only)."""
    proj_drop: Rate = 0.0
    """Dropout after the output projection (training only)."""
    qkv: Literal["fused", "split"] = "fused"
    """``fused``: one ``qkv`` projection (dim → 3 dim), as ViT; ``split``: ``q`` (dim → dim) and ``kv`` (dim → 2
    dim), as PVT-v2, which `sr_ratio` and `kv_pool` need (keys and values come from the reduced map)."""
    sr_ratio: PositiveInt = 1
    """Spatial reduction of keys and values (PVT-v2): above 1, they are computed from the token map reduced by
    ``sr``, a conv of kernel and stride `sr_ratio`, then ``norm`` (LayerNorm); the map must be at least
    `sr_ratio` on each side."""
    kv_pool: PositiveInt | None = None
    """Pooled keys and values (PVT-v2-li's linear attention): the token map is average-pooled to a fixed
    `kv_pool` x `kv_pool` map (7 in timm), then ``sr`` (1x1 conv), ``norm`` (LayerNorm) and GELU, whatever the
    input size; null: off. Replaces `sr_ratio` (keep it 1)."""
    norm_eps: PositiveFloat = 1e-5
    """Epsilon of ``norm`` (after ``sr``) and of ``q_norm``/``k_norm``; 1e-5 is timm's PVT-v2."""
    qk_norm: bool = False
    """LayerNorm each head's queries and keys (``q_norm``, ``k_norm``, timm's ``qk_norm``)."""

    def takes_size(self, *inputs: TensorType) -> bool:
        return self.sr_ratio > 1 or self.kv_pool is not None

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        self.check_heads(ctx)
        if not self.takes_size():
            return x
        field = "sr_ratio" if self.kv_pool is None else "kv_pool"
        if self.qkv == "fused":
            ctx.fail(
                f"`{field}` reduces keys and values apart from the queries, but `qkv: fused` computes them together",
                field="qkv",
                hint="set `qkv: split` (PVT-v2's `q` and `kv` projections)",
            )
        if self.kv_pool is not None and self.sr_ratio > 1:
            ctx.fail(
                f"`kv_pool` pools keys and values to {self.kv_pool}x{self.kv_pool} in place of the spatial "
                f"reduction, but `sr_ratio` is {self.sr_ratio}",
                field="sr_ratio",
                hint="set `sr_ratio: 1` with `kv_pool` (timm's linear attention ignores the ratio)",
            )
        if x.extra:
            ctx.fail(
                f"`{field}` reduces the token map, but the tokens carry {x.extra} extra token(s) (cls) before it",
                field="from",
                hint="remove the extra tokens before this block (remove_cls_token), or set "
                f"`{field}: {1 if field == 'sr_ratio' else 'null'}`",
            )
        if self.kv_pool is None:
            assert x.grid is not None
            for size in x.grid:
                ctx.conv_out(size, self.sr_ratio, self.sr_ratio, field="sr_ratio")
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.attention import Attention

        return Attention(**self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        sr_kernel = (1 if self.kv_pool is not None else self.sr_ratio) if self.takes_size() else None
        head_norm = self.dim // self.heads if self.qk_norm else None
        return count.attention(self.dim, self.qkv_bias, sr_kernel=sr_kernel, head_norm=head_norm)
