"""CoaT's token ops (Xu et al., "Co-Scale Conv-Attentional Image Transformers", ICCV 2021), in the token layout
``[B, N, ...]`` where the extra (cls) tokens come first and the last ``H*W`` tokens are the image, row-major.

Each is one formula with two kernels: the reference (differentiable; training, torch.compile, export) and, in
eager inference (:func:`~blockgraph.ops.kernel.eager_inference`), the same sums written straight into the output's
layout, so that the reference's copies (scale, add, concatenate, transpose) become one pass; in eager inference the
faster of the two on this machine runs (measured on first use, :mod:`blockgraph.ops.autotune`). In eager training,
:func:`factor_attention_crpe` is the whole attention (CRPE convolution, factorized attention, the CRPE term) as one
autograd node with its own backward (:class:`_FactorAttentionCrpe`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor

from blockgraph.ops.autotune import run_chosen
from blockgraph.ops.conv import depthwise_conv2d, depthwise_conv2d_backward
from blockgraph.ops.kernel import as_autocast_runs, eager_inference, symbolic_tracing

torch.fx.wrap("depthwise_conv2d")  # torch.fx records the call: its kernel choice reads strides, which a trace lacks


def conv_pos_enc(x: Tensor, size: tuple[int, int], weight: Tensor, bias: Tensor | None) -> Tensor:
    """The convolutional position encoding of tokens ``x`` ``[B, N, C]``: ``x + DWConv(x)`` at the image tokens of
    the ``size`` grid (depthwise ``weight`` ``[C, 1, k, k]``, 'same' padding); the extra tokens pass unchanged."""
    B, N, C = x.shape
    H, W = size
    extra = N - H * W
    feat = x[:, extra:].transpose(1, 2).view(B, C, H, W)  # [B, C, H, W], channels-last strides
    y = depthwise_conv2d(feat, weight, bias, (weight.shape[-1] // 2, weight.shape[-1] // 2))
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


def factor_attention_crpe(
    qkv: Tensor, scale: float, size: tuple[int, int], weight: Tensor, bias: Tensor | None
) -> Tensor:
    """CoaT's attention of every token, for eager training: :func:`factor_attention` of the q, k, v of ``qkv``
    ``[B, N, 3, h, Ch]`` (a view of the qkv projection) with the CRPE term, the CRPE being the depthwise convolution
    (``weight`` ``[h*Ch, 1, k, k]``, ``bias``, 'same' padding; the windows merged,
    :func:`~blockgraph.ops.conv.merge_depthwise`) of the image tokens' values on the ``size`` grid. ``[B, N, h*Ch]``.

    The same values as the reference ops (tests/ops/test_coat.py: gradients within 1e-10 in float64), as one
    autograd node whose backward writes the q, k and v gradients straight into one ``[B, N, 3, h, Ch]`` tensor: the
    reference's graph adds the two gradients of q and of v in the token layout with one strided operand, fills and
    copies a zero tensor for each slice of the image tokens, and stacks q, k and v. Under autocast it runs in the
    autocast dtype, as the reference's ops do there (the projection's output is already in it; the convolution's
    weight and bias are cast).
    """
    return as_autocast_runs(_FactorAttentionCrpe.apply, (qkv, weight, bias), scale, size)


def crpe_conv(v: Tensor, size: tuple[int, int], weight: Tensor, bias: Tensor | None) -> Tensor:
    """The CRPE's depthwise convolution (``weight`` ``[h*Ch, 1, k, k]``, odd ``k``, 'same' padding; the windows
    merged) of the image tokens' values ``v`` ``[B, H*W, h, Ch]`` (channel = head * Ch + c), in the same layout: the
    map is a view of the tokens (channels-last strides), and so is the result's."""
    B, L, h, Ch = v.shape
    p = weight.shape[-1] // 2
    return depthwise_conv2d(_as_map(v, size), weight, bias, (p, p)).permute(0, 2, 3, 1).reshape(B, L, h, Ch)


def _as_map(t: Tensor, size: tuple[int, int]) -> Tensor:
    """Image tokens ``[B, H*W, h, Ch]`` as a map ``[B, h*Ch, H, W]`` (a view where the strides allow)."""
    return t.reshape(t.shape[0], size[0], size[1], -1).permute(0, 3, 1, 2)


def _crpe_reference(qkv: Tensor, scale: float, size: tuple[int, int], weight: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`factor_attention_crpe` by the reference ops (differentiable)."""
    q, k, v = qkv.unbind(2)
    return factor_attention(q, k, v, scale, crpe_conv(v[:, v.shape[1] - size[0] * size[1] :], size, weight, bias))


class _FactorAttentionCrpe(torch.autograd.Function):
    """:func:`factor_attention_crpe`: the forward as the inference kernel computes it, a backward of its own."""

    @staticmethod
    def forward(
        ctx: Any, qkv: Tensor, weight: Tensor, bias: Tensor | None, scale: float, size: tuple[int, int]
    ) -> Tensor:
        B, N, _, h, Ch = qkv.shape
        q, k, v = qkv.unbind(2)
        L = size[0] * size[1]
        conv_v = crpe_conv(v[:, N - L :], size, weight, bias)
        ks = k.transpose(1, 2).softmax(dim=2)  # [B, h, N, Ch]
        kv = ks.transpose(-1, -2) @ v.transpose(1, 2)  # [B, h, Ch, Ch]
        factor = q.transpose(1, 2) @ kv
        ctx.save_for_backward(qkv, weight, bias, ks, kv, conv_v)
        ctx.scale, ctx.size = scale, size
        out = torch.mul(factor.transpose(1, 2), scale, out=q.new_empty(B, N, h, Ch))
        out[:, N - L :] += q[:, N - L :] * conv_v  # (a product, then a sum: the reference's roundings, its bits)
        return out.view(B, N, h * Ch)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qkv, weight, bias, ks, kv, conv_v = ctx.saved_tensors
        scale, size = ctx.scale, ctx.size
        if torch.is_grad_enabled():  # create_graph: the reference's graph, made again, differentiates itself
            inputs = [t for t in (qkv, weight, bias) if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(_crpe_reference(qkv, scale, size, weight, bias), inputs, grad,
                                             create_graph=True))  # fmt: skip
            return (*(next(grads) if t is not None and t.requires_grad else None for t in (qkv, weight, bias)),
                    None, None)  # fmt: skip
        B, N, _, h, Ch = qkv.shape
        L = size[0] * size[1]
        extra = N - L
        q, k, v = qkv.unbind(2)
        g = grad.reshape(B, N, h, Ch)
        gh = g.transpose(1, 2)  # [B, h, N, Ch]
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        dq, dk, dv = dqkv.unbind(2)
        # out = scale * q kv (+ q * conv_v at the image tokens), kv = softmax_N(k)^T v
        dq.copy_((gh @ (kv.transpose(-1, -2) * scale)).transpose(1, 2))
        dq[:, extra:].addcmul_(g[:, extra:], conv_v)
        dkv = (q.transpose(1, 2).transpose(-1, -2) @ gh) * scale  # [B, h, Ch, Ch]
        dv.copy_((ks @ dkv).transpose(1, 2))
        dks = v.transpose(1, 2) @ dkv.transpose(-1, -2)
        dk.copy_(torch._softmax_backward_data(dks, ks, 2, ks.dtype).transpose(1, 2))
        # the CRPE convolution of the image tokens' values; its input gradient joins v's
        p = weight.shape[-1] // 2
        need = (True, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        d_conv = _as_map(g[:, extra:] * q[:, extra:], size)
        d_img, d_weight, d_bias = depthwise_conv2d_backward(d_conv, _as_map(v[:, extra:], size), weight, (p, p), need)
        dv[:, extra:].add_(d_img.permute(0, 2, 3, 1).reshape(B, L, h, Ch))
        return dqkv, d_weight, d_bias, None, None
