"""Multi-head self-attention on tokens, in timm's two layouts: ViT's fused ``qkv`` projection (Dosovitskiy et al.,
"An Image is Worth 16x16 Words", ICLR 2021) and PVT-v2's ``q`` and ``kv`` projections with keys and values
optionally reduced on the token map (Wang et al., "PVT v2: Improved Baselines with Pyramid Vision Transformer",
CVMJ 2022)."""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from blockgraph.layers.common import linear, qkv_heads
from blockgraph.layers.conv import conv2d


class Attention(nn.Module):
    """Softmax attention through ``F.scaled_dot_product_attention`` (scale ``d ** -0.5``), then ``proj``.

    ``qkv="fused"``: ``qkv`` (dim → 3 dim, rows q, k, v), as timm's ``Attention``. ``qkv="split"``: ``q`` (dim →
    dim) and ``kv`` (dim → 2 dim, rows k, v), as timm's ``pvt_v2.Attention``; the keys and values are then computed
    from the token map reduced by ``sr`` (a ``sr_ratio`` x ``sr_ratio`` conv of that stride) and ``norm``, or, with
    ``kv_pool``, by ``pool`` (adaptive average to ``kv_pool`` x ``kv_pool``), ``sr`` (1x1 conv), ``norm`` and
    ``act`` (GELU). ``qk_norm``: ``q_norm`` and ``k_norm``, LayerNorms over each head's channels.
    """

    def __init__(
        self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
        qkv: Literal["fused", "split"] = "fused", sr_ratio: int = 1, kv_pool: int | None = None,
        norm_eps: float = 1e-5, qk_norm: bool = False, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if qkv == "fused" and (sr_ratio > 1 or kv_pool is not None):
            raise ValueError("reducing keys and values (sr_ratio > 1 or kv_pool) needs qkv='split'")
        self.heads = heads
        self.attn_drop = attn_drop
        self.reduces = sr_ratio > 1 or kv_pool is not None
        # timm's module order, so that state_dicts list their keys alike
        self.qkv = linear(dim, 3 * dim, bias=qkv_bias, **dd) if qkv == "fused" else None
        self.q = linear(dim, dim, bias=qkv_bias, **dd) if qkv == "split" else None
        self.kv = linear(dim, 2 * dim, bias=qkv_bias, **dd) if qkv == "split" else None
        self.q_norm = nn.LayerNorm(dim // heads, eps=norm_eps, **dd) if qk_norm else None
        self.k_norm = nn.LayerNorm(dim // heads, eps=norm_eps, **dd) if qk_norm else None
        self.proj = linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pool = nn.AdaptiveAvgPool2d(kv_pool) if kv_pool is not None else None
        kernel = 1 if kv_pool is not None else sr_ratio
        self.sr = conv2d(dim, dim, kernel, kernel, init="fan_out", **dd) if self.reduces else None
        self.norm = nn.LayerNorm(dim, eps=norm_eps, **dd) if self.reduces else None
        self.act = nn.GELU() if kv_pool is not None else None

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Attention of the tokens ``x`` ``[B, N, C]`` to themselves (or to the reduced map, whose grid ``size`` =
        ``(h, w)`` with ``N == h * w`` the module then needs)."""
        B, N, C = x.shape
        if self.qkv is not None:
            q, k, v = qkv_heads(x, self.qkv.weight, self.qkv.bias, self.heads)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, N, d]
        else:
            assert self.q is not None and self.kv is not None
            q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)  # [B, heads, N, d]
            if self.reduces:
                x = self._reduce(x, size)  # [B, M, C]
            k, v = self.kv(x).view(B, -1, 2, self.heads, C // self.heads).unbind(2)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            # k, v: [B, heads, M, d]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # [B, N, heads*d]
        return self.proj_drop(self.proj(x))

    def _reduce(self, x: Tensor, size: tuple[int, int] | None) -> Tensor:
        """The tokens ``[B, h*w, C]`` as a map, reduced (``sr``, or ``pool`` then ``sr``), back to tokens
        ``[B, M, C]``, normalized (and activated, with ``kv_pool``)."""
        assert size is not None and self.sr is not None and self.norm is not None, "the token grid (h, w) is needed"
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, size[0], size[1])  # [B, C, h, w] (a view: channels last)
        if self.pool is not None:
            x = self.pool(x)  # [B, C, kv_pool, kv_pool]
        x = self.sr(x).reshape(B, C, -1).transpose(1, 2)  # [B, M, C]
        x = self.norm(x)
        return x if self.act is None else self.act(x)
