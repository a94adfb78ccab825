"""Convolution ops: Conv-BN(-activation) folded for inference, depthwise convolutions over channel groups merged
into one, and a depthwise convolution of a map viewed from tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockgraph.ops.kernel import eager_inference, in_place, remember, stamp


def conv_bn(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    act: nn.Module | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``residual + act(bn(conv(x)))`` (``act`` and ``residual`` optional).

    In eager inference (:func:`~blockgraph.ops.kernel.eager_inference`) with ``bn`` in eval mode (an affine map per
    channel): one convolution whose weight and bias have the BatchNorm folded in (:func:`folded`), the activation and
    the add in place. On the CPU the folded weight is channels-last: oneDNN then skips the layout reorders of every
    input and output, and the maps that follow stay channels-last. Otherwise, and for a BatchNorm without running
    statistics (it normalizes by the batch even in eval) or padding other than zeros: the layers themselves.
    """
    fast = eager_inference(x)
    if fast and not bn.training and bn.running_mean is not None and conv.padding_mode == "zeros":
        weight, bias = folded(conv, bn, channels_last=x.device.type == "cpu")
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    else:
        y = bn(conv(x))
    if act is not None:
        y = in_place(act, y) if fast else act(y)
    if residual is None:
        return y
    return y.add_(residual) if fast else residual + y


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels_last: bool) -> tuple[Tensor, Tensor]:
    """``conv``'s weight and bias with the eval-mode ``bn`` folded in, cached on ``conv`` and made again whenever one
    of the tensors changes (version counter or storage: an optimizer step, ``load_state_dict``, ``.to()``; a training
    forward updates the running statistics without a new version, but counts itself in ``num_batches_tracked``).

    ``bn(conv(x)) = conv(x) * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``, so the weight's output
    channel ``o`` scales by ``s[o]`` and the bias is ``(b - mean) * s + beta``.
    """
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
    key = (stamp(*tensors), bn.eps, channels_last)
    return remember(conv, "_blockgraph_folded", key, lambda: _fold(conv, bn, channels_last))


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels_last: bool) -> tuple[Tensor, Tensor]:
    assert bn.running_mean is not None and bn.running_var is not None  # (conv_bn folds only such a BatchNorm)
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
    bias = bias * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    return weight, bias


def merge_depthwise(convs: Sequence[nn.Conv2d]) -> tuple[Tensor, Tensor | None]:
    """One depthwise convolution equal to ``torch.cat([conv(part) for conv, part in zip(convs, parts)], 1)`` over
    consecutive channel parts: each kernel zero-padded (centered) to the largest, so each output is the same sum
    plus exact zeros. One launch instead of a split, one convolution per kernel size and a concatenation; the
    padded taps cost less than the copies they save.

    Built from the weights with differentiable ops (pad, concatenate), so gradients reach each convolution's own
    weight and bias; in eager inference the result is cached on the first convolution until a tensor changes.

    Raises:
        ValueError: a convolution is not depthwise with an odd square kernel, stride and dilation 1 and 'same'
            zero padding.
    """
    for conv in convs:
        k = conv.kernel_size
        if (
            conv.groups != conv.in_channels
            or conv.out_channels != conv.in_channels
            or k[0] != k[1]
            or k[0] % 2 == 0
            or conv.padding != (k[0] // 2, k[1] // 2)
            or conv.stride != (1, 1)
            or conv.dilation != (1, 1)
            or conv.padding_mode != "zeros"
        ):
            raise ValueError(f"cannot merge {conv}: not a depthwise, odd-kernel, stride-1 'same' convolution")
    if not eager_inference(convs[0].weight):
        return _merge(convs)
    key = stamp(*(t for conv in convs for t in (conv.weight, conv.bias)))
    return remember(convs[0], "_blockgraph_merged", key, lambda: _merge(convs))


def _merge(convs: Sequence[nn.Conv2d]) -> tuple[Tensor, Tensor | None]:
    size = max(conv.kernel_size[0] for conv in convs)
    weight = torch.cat([F.pad(c.weight, [(size - c.kernel_size[0]) // 2] * 4) for c in convs])
    bias = None
    if any(conv.bias is not None for conv in convs):
        bias = torch.cat([c.weight.new_zeros(c.out_channels) if c.bias is None else c.bias for c in convs])
    return weight, bias


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, groups=C)`` for a depthwise weight ``[C, 1, kh, kw]``. When
    ``x``'s channels are its innermost dim (a map viewed from tokens ``[B, N, C]``), the weight goes in as a view
    with channels-last strides: the same memory (only its size-1 dim's stride differs), so autograd and every path
    may use it.

    oneDNN then runs its channels-last kernel on ``x`` as it is, whatever the strides of ``x``'s size-1 dims. At
    batch 1 (eager views, and inductor's under torch.compile) the batch dim's stride makes ``suggest_memory_format``
    read such a map as channels-first, so with the plain weight the convolution copied its input to NCHW and ran
    NCHW's slower depthwise kernel. At larger batches both weights give the same kernel and bits. A channels-first
    ``x`` keeps the plain weight (its kernel and results unchanged).
    """
    if x.stride(1) == 1 and x.shape[1] > 1 and weight.is_contiguous():
        weight = weight.as_strided(weight.shape, (weight.stride(0), 1, weight.stride(2), weight.stride(3)))
    return F.conv2d(x, weight, bias, padding=[padding, padding], groups=weight.shape[0])
