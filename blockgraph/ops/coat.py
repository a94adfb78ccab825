"""CoaT's token ops (Xu et al., "Co-Scale Conv-Attentional Image Transformers", ICCV 2021), in the token layout
``[B, N, ...]`` where the extra (cls) tokens come first and the last ``H*W`` tokens are the image, row-major.

Each is one formula with two kernels: the reference (differentiable; training, torch.compile, export) and, in
eager inference (:func:`~blockgraph.ops.kernel.eager_inference`), the same sums written straight into the output's
layout, so that the reference's copies (scale, add, concatenate, transpose) become one pass; in eager inference the
faster of the two on this machine runs (measured on first use, :mod:`blockgraph.ops.autotune`).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from blockgraph.ops.autotune import run_chosen
from blockgraph.ops.conv import depthwise_conv2d
from blockgraph.ops.kernel import eager_inference, symbolic_tracing

torch.fx.wrap("depthwise_conv2d")  # torch.fx records the call: its kernel choice reads strides, which a trace lacks


def conv_pos_enc(x: Tensor, size: tuple[int, int], weight: Tensor, bias: Tensor | None) -> Tensor:
    """The convolutional position encoding of tokens ``x`` ``[B, N, C]``: ``x + DWConv(x)`` at the image tokens of
    the ``size`` grid (depthwise ``weight`` ``[C, 1, k, k]``, 'same' padding); the extra tokens pass unchanged."""
    B, N, C = x.shape
    H, W = size
    extra = N - H * W
    feat = x[:, extra:].transpose(1, 2).view(B, C, H, W)  # [B, C, H, W], channels-last strides
    y = depthwise_conv2d(feat, weight, bias, weight.shape[-1] // 2)
    if not torch.jit.is_scripting():
        if eager_inference(x):  # the sum written in place of the concatenation, or the plain ops: the faster here
            fused, plain = partial(_cpe_fused, x, y, feat, extra), partial(_cpe_plain, x, y, feat, extra)
            key = ("conv_pos_enc", tuple(x.shape), tuple(weight.shape), x.dtype, tuple(x.stride()))
            return run_chosen(key, {"fused": fused, "plain": plain}, device=x.device)
    return _cpe_plain(x, y, feat, extra)


def _cpe_fused(x: Tensor, y: Tensor, feat: Tensor, extra: int) -> Tensor:
    B, C, H, W = feat.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out[:, :extra] = x[:, :extra]
    torch.add(y, feat, out=out[:, extra:].transpose(1, 2).view(B, C, H, W))
    return out


def _cpe_plain(x: Tensor, y: Tensor, feat: Tensor, extra: int) -> Tensor:
    out = (y + feat).flatten(2).transpose(1, 2)  # [B, H*W, C]
    return torch.cat((x[:, :extra], out), dim=1) if symbolic_tracing() or extra else out


def factor_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, conv_v: Tensor | None = None) -> Tensor:
    """Factorized attention with the convolutional relative position term: ``scale * q (softmax_N(k)^T v)``, plus
    ``q * conv_v`` at the last ``L`` queries (the image tokens; the extra tokens in front get no term).

    Args:
        q: ``[B, Nq, h, Ch]``, the queries of the first ``Nq`` tokens (views of the qkv projection do).
        k, v: ``[B, N, h, Ch]``, the keys and values of every token.
        scale: the factor of the attention term (``Ch ** -0.5``).
        conv_v: ``[B, L, h, Ch]``, the CRPE's depthwise convolution of the image tokens' values, or None.

    Returns:
        ``[B, Nq, h * Ch]``.
    """
    B, Nq, h, Ch = q.shape
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, h, N, Ch]
    factor = qh @ (kh.softmax(dim=2).transpose(-1, -2) @ vh)  # [B, h, Nq, Ch]
    extra = Nq if conv_v is None else Nq - conv_v.shape[1]
    if not torch.jit.is_scripting():
        if eager_inference(q):  # the scale and the term written into the output's layout, or the plain ops
            fused = partial(_factor_fused, q, factor, scale, conv_v, extra)
            plain = partial(_factor_plain, q, factor, scale, conv_v, extra)
            key = ("factor_attention", tuple(q.shape), tuple(k.shape), conv_v is not None, q.dtype)
            return run_chosen(key, {"fused": fused, "plain": plain}, device=q.device)
    return _factor_plain(q, factor, scale, conv_v, extra)


def _factor_fused(q: Tensor, factor: Tensor, scale: float, conv_v: Tensor | None, extra: int) -> Tensor:
    B, Nq, h, Ch = q.shape
    out = torch.mul(factor.transpose(1, 2), scale, out=q.new_empty(B, Nq, h, Ch))
    if conv_v is not None:
        out[:, extra:].addcmul_(q[:, extra:], conv_v)
    return out.view(B, Nq, h * Ch)


def _factor_plain(q: Tensor, factor: Tensor, scale: float, conv_v: Tensor | None, extra: int) -> Tensor:
    B, Nq, h, Ch = q.shape
    out = (scale * factor).transpose(1, 2)  # [B, Nq, h, Ch]
    if conv_v is not None:
        term = q[:, extra:] * conv_v
        out = torch.cat((out[:, :extra], out[:, extra:] + term), dim=1) if symbolic_tracing() or extra else out + term
    return out.reshape(B, Nq, h * Ch)
