"""Convolution ops: a convolution with its activation in oneDNN's epilogue for inference, a channels-last 1x1
convolution as oneDNN's linear layer in training, Conv-BN(-activation) folded for inference, depthwise convolutions
over channel groups merged into one, and a depthwise convolution of a map viewed from tokens (with a backward of our
own in training)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockgraph.ops import _cpp
from blockgraph.ops.autotune import run_chosen
from blockgraph.ops.kernel import (
    as_autocast_runs,
    autocast_dtype,
    compiled_inference,
    compiled_training,
    eager_inference,
    eager_training,
    in_place,
    remember,
    residual_training,
    stamp,
)
from blockgraph.ops.linear import (
    onednn_applies,
    onednn_linear,
    packed,
    post_op,
    post_op_module,
    run_packed,
    scaled,
)


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    act: nn.Module | None = None,
    residual: Tensor | None = None,
    scale: Tensor | None = None,
    samples: Tensor | None = None,
) -> Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding, dilation, groups))`` (``act`` optional), zero padding; or,
    given a ``residual`` (and no ``act``), ``residual + samples * scale * F.conv2d(...)`` (``scale``: per-channel
    factors, a layer scale; ``samples``: per-sample factors ``[B, 1, 1, 1]``, a drop path's, in an eager training
    step only; both optional).

    In eager inference (:func:`~blockgraph.ops.kernel.eager_inference`) on the CPU in float32 without autocast, with
    no activation or one oneDNN has as a post-op (ReLU, GELU, SiLU, Hardswish), or with a residual: oneDNN's
    convolution (``mkldnn._convolution_pointwise``, the op inductor's CPU backend emits for frozen weights) on the
    weight packed once into its blocked layout (:func:`~blockgraph.ops.linear.packed`; ``F.conv2d`` reorders it on
    every call), with the activation or the residual's add in its epilogue, where the plain path makes a second pass
    over the output; or the plain convolution with the activation or the add in place, whichever measured faster
    here for this shape and memory format (:mod:`blockgraph.ops.autotune`; by default, when measuring is off or the
    two are within its margin, oneDNN's with an activation, a residual or a packed weight; the plain one for a
    channels-first input without an activation, where both run oneDNN's convolution on the plain weight). The scale
    is folded into the weights (:func:`~blockgraph.ops.linear.scaled`). A graph torch.compile traces for inference
    calls this eager inference path as an opaque op (``blockgraph::conv2d_inference``) where it has something to
    gain (an activation, or a map with its channels innermost, whose weight is packed): inductor without freezing
    would run the convolution on the unpacked weight, and the activation, scale and add in passes of their own.
    In an eager training step on the CPU in float32, a 1x1 convolution (stride 1, one group) of a map with its
    channels innermost runs the convolution or oneDNN's linear layer on the map's ``[B, h, w, C]`` view
    (:func:`_pointwise_linear`), whichever measured faster over a forward and a backward (InceptionNeXt-T's 56x56 and
    28x28 layers take the linear one). Otherwise the plain convolution, then the activation, or the scale and the
    add; with a scale or per-sample factors, the scale folded into the weights and the add one ``addcmul``
    (:func:`~blockgraph.ops.kernel.residual_training`)."""
    if residual is not None and (scale is not None or samples is not None) and eager_training(x):
        geometry = (stride, padding, dilation, groups)
        conv = partial(_conv2d_training, x, geometry)
        return residual_training(conv, weight, bias, residual, scale, samples)
    assert samples is None, "per-sample factors are for an eager training step"
    fast = eager_inference(x)
    if not fast and compiled_inference() and onednn_applies(x, weight):
        post = post_op(act)
        if post is not None and (post[0] != "none" or _channels_innermost(x)):
            return torch.ops.blockgraph.conv2d_inference(
                x, weight, bias, list(stride), list(padding), list(dilation), groups, *post, residual, scale
            )
    if residual is not None:
        return _residual_conv2d(x, weight, bias, (stride, padding, dilation, groups), residual, scale, fast)
    post = post_op(act) if fast else None
    if post is not None and onednn_applies(x, weight):
        depthwise = weight.shape[1] == 1 and groups == weight.shape[0] > 1
        w = _weight_like(x, weight) if depthwise else weight
        fused = partial(_fused, x, weight, bias, (stride, padding, dilation, groups), post)
        plain = partial(_act_in_place, act, partial(F.conv2d, x, w, bias, stride, padding, dilation, groups))
        packs = _channels_innermost(x)  # (_fused reads the weight packed)
        candidates = (
            {"fused": fused, "plain": plain} if post[0] != "none" or packs else {"plain": plain, "fused": fused}
        )
        key = ("conv2d", *post, tuple(x.shape), x.is_contiguous(), x.stride(1) == 1, tuple(weight.shape),
               bias is not None, stride, padding, dilation, groups)  # fmt: skip
        return run_packed(key, weight, candidates, x.device)
    y = recorded_conv2d(x, weight, bias, (stride, padding, dilation, groups))
    if act is None:
        return y
    return in_place(act, y) if fast else act(y)


def recorded_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, args: tuple[Any, ...]) -> Tensor:
    """``F.conv2d(x, weight, bias, *args)`` (``args``: stride, padding, dilation, groups), or in an eager training
    step a channels-last 1x1 convolution's faster kernel (:func:`_pointwise_training`). ``torch.fx`` records it as
    one call, so that a traced graph runs the very kernel the model runs (timm's fx test compares the two bit for
    bit), as :func:`~blockgraph.ops.linear.recorded_linear`."""
    if _pointwise_training(x, weight, args):
        plain = partial(F.conv2d, x, weight, bias, *args)
        key = ("conv2d", "train", tuple(x.shape), tuple(weight.shape), bias is not None, x.requires_grad)
        candidates = {"plain": plain, "linear": partial(_pointwise_linear, x, weight, bias)}
        return run_chosen(key, candidates, device=x.device, training=True)
    return F.conv2d(x, weight, bias, *args)


torch.fx.wrap("recorded_conv2d")


def _conv2d_training(x: Tensor, geometry: tuple[Any, ...], weight: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`recorded_conv2d` with the weight and bias last (the product :func:`conv2d` gives
    :func:`~blockgraph.ops.kernel.residual_training`)."""
    return recorded_conv2d(x, weight, bias, geometry)


def _pointwise_training(x: Tensor, weight: Tensor, args: tuple[Any, ...]) -> bool:
    """Whether a convolution is a 1x1 one (stride 1, no padding, one group) on a map with its channels innermost in
    an eager training step on the CPU in float32: a product ``[B * h * w, C] x [C, C_out]`` over the map's memory as
    it is, which the oneDNN linear layer's training kernel may compute (:func:`_pointwise_linear`)."""
    stride, padding, _, groups = args
    return (
        eager_training(x)  # (first: False for a trace's proxies, whose shapes are no values)
        and groups == 1
        and tuple(stride) == (1, 1)
        and tuple(padding) == (0, 0)
        and weight.shape[2:] == (1, 1)
        and _channels_innermost(x)
        and onednn_applies(x, weight)
    )


def _pointwise_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution of a map with its channels innermost as a linear layer on its ``[B, h, w, C]`` view, through
    oneDNN's training kernel (:func:`~blockgraph.ops.linear.onednn_linear`), whose weight gradient (oneDNN's matrix
    multiply on the transposed views) takes 0.6-0.8 of the convolution's backward-weights time at InceptionNeXt's
    56x56 layers; the output is the channels-last map the convolution returns (a view: no copy either way)."""
    y = onednn_linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias)
    return y.permute(0, 3, 1, 2)


# The eager inference path as an op a compiled graph calls (:func:`conv2d`): inductor runs it as an opaque call, as it
# runs ``aten.convolution``; it runs when the graph runs, eagerly (packed weights, epilogues, the kernel choice
# measured on this machine), and makes its output in the memory format the fake kernel promises: channels-last for
# an input with its channels innermost, else contiguous.
_LIBRARY = torch.library.Library("blockgraph", "FRAGMENT")
_LIBRARY.define(
    "conv2d_inference(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups,"
    " str post, str algorithm, Tensor? residual, Tensor? scale) -> Tensor"
)


def _conv2d_inference(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
    groups: int, post: str, algorithm: str, residual: Tensor | None, scale: Tensor | None,
) -> Tensor:  # fmt: skip
    geometry = ((stride[0], stride[1]), (padding[0], padding[1]), (dilation[0], dilation[1]))
    y = conv2d(x, weight, bias, *geometry, groups, post_op_module(post, algorithm), residual, scale)
    return y.contiguous(memory_format=_format_of(x))


def _conv2d_inference_fake(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
    groups: int, *args: Any,
) -> Tensor:  # fmt: skip
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # (on fake tensors: the size, no arithmetic)
    return y.contiguous(memory_format=_format_of(x))


_LIBRARY.impl("conv2d_inference", _conv2d_inference, "CPU")
torch.library.register_fake("blockgraph::conv2d_inference")(_conv2d_inference_fake)


def _format_of(x: Tensor) -> torch.memory_format:
    """The memory format of a convolution's output in eager inference: channels-last for an input with its
    channels innermost, else contiguous."""
    return torch.channels_last if _channels_innermost(x) else torch.contiguous_format


def _residual_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    geometry: tuple[tuple[int, int], tuple[int, int], tuple[int, int], int],
    residual: Tensor,
    scale: Tensor | None,
    fast: bool,
) -> Tensor:
    """``residual + scale * F.conv2d(x, weight, bias, *geometry)`` (``geometry``: stride, padding, dilation,
    groups; see :func:`conv2d`)."""
    stride, padding, dilation, groups = geometry
    if not fast:
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return residual + (y if scale is None else y * scale.view(1, -1, 1, 1))
    if scale is not None:
        weight, bias = scaled(weight, bias, scale)
    depthwise = weight.shape[1] == 1 and groups == weight.shape[0] > 1
    w = _weight_like(x, weight) if depthwise else weight
    plain = partial(_add_in_place, residual, partial(F.conv2d, x, w, bias, stride, padding, dilation, groups))
    if not (onednn_applies(x, weight) and _channels_innermost(x) and residual.stride(1) == 1):
        return plain()
    fused = partial(_fused, x, weight, bias, geometry, None, residual)
    key = ("conv2d", "add", tuple(x.shape), tuple(weight.shape), bias is not None, stride, padding, dilation,
           groups, residual.is_contiguous(memory_format=torch.channels_last))  # fmt: skip
    return run_packed(key, weight, {"fused": fused, "plain": plain}, x.device)


def _add_in_place(residual: Tensor, conv: Callable[[], Tensor]) -> Tensor:
    """The plain eager inference kernel with a residual: the convolution ``conv()``, then the add in place."""
    return conv().add_(residual)


def _fused(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    geometry: tuple[tuple[int, int], tuple[int, int], tuple[int, int], int],
    post: tuple[str, str] | None,
    residual: Tensor | None = None,
) -> Tensor:
    """The fused eager inference kernel: oneDNN's convolution (``geometry``: stride, padding, dilation, groups) with
    the post-op ``post`` (oneDNN's name and algorithm) or the add of ``residual`` in its epilogue. A channels-last
    input reads the weight packed for it (``mkldnn._reorder_convolution_weight`` given the input's size; made again
    for another size past the batch); a channels-first one reads the plain weight (the kernel makes a channels-last
    output for a packed weight, whatever the input's format)."""
    stride, padding, dilation, groups = geometry
    args = (list(padding), list(stride), list(dilation), groups)
    if _channels_innermost(x):
        size = list(x.shape)
        weight = packed(
            weight, (*args, tuple(size[1:])), lambda w: torch.ops.mkldnn._reorder_convolution_weight(w, *args, size)
        )
    if residual is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, weight, bias, *args, "add", None, None, [], None
        )
    assert post is not None
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, post[0], [], post[1])


def _channels_innermost(x: Tensor) -> bool:
    """Whether ``x``, a map ``[B, C, h, w]``, has its channels innermost (channels-last memory, or a map viewed from
    tokens): oneDNN's channels-last kernels read it as it is."""
    return x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1


def _act_in_place(act: nn.Module | None, conv: Callable[[], Tensor]) -> Tensor:
    """The plain eager inference kernel: the convolution ``conv()``, then the activation (if any) in place."""
    y = conv()
    return y if act is None else in_place(act, y)


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


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, groups=C)`` for a depthwise weight ``[C, 1, kh, kw]`` (stride 1,
    zero ``padding`` ``(ph, pw)``).

    When ``x``'s channels are its innermost dim (a map viewed from tokens ``[B, N, C]``, or a channels-last map), the
    weight goes in as a view with channels-last strides: the same memory (only its size-1 dim's stride differs), so
    autograd and every path may use it. oneDNN then runs its channels-last kernel on ``x`` as it is, whatever the
    strides of ``x``'s size-1 dims. At batch 1 (eager views, and inductor's under torch.compile) the batch dim's
    stride makes ``suggest_memory_format`` read such a map as channels-first, so with the plain weight the
    convolution copied its input to NCHW and ran NCHW's slower depthwise kernel. At larger batches both weights give
    the same kernel and bits. A channels-first ``x`` keeps the plain weight (its kernel and results unchanged).

    In eager training on the CPU (:func:`~blockgraph.ops.kernel.eager_training`, the C++ kernels built) the backward
    pass has two kernels, chosen at the forward by timing a forward and a backward of each on first use of the shape
    (:mod:`blockgraph.ops.autotune`): torch's (its own autograd node, oneDNN's backward-data and backward-weights:
    the weight gradient of a kernel larger than 3x3 takes 5-15x the forward) or ours (an autograd Function): the
    input gradient as the forward convolution of the output gradient with the flipped kernel, the weight gradient by
    the C++ kernel ``blockgraph_conv::depthwise_weight_grad`` (one pass of fused multiply-adds over the channels-last
    maps, sums in float32), the bias gradient a sum. Under ``create_graph`` (a gradient of the gradient) the backward
    is torch's, which is differentiable.
    """
    if not torch.jit.is_scripting():  # (TorchScript compiles no branch under this test)
        if (
            (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
            and x.dim() == 4
            and weight.shape[1] == 1
            and weight.shape[0] == x.shape[1]
            and weight.shape[-1] <= 64
        ):
            if eager_training(x) and _kernels_built():
                return _trained(x, weight, bias, padding)
            if compiled_training(x) and _kernels_built():
                return _trained(x, weight, bias, padding, compiled=True)
    return _depthwise(x, weight, bias, padding)


@torch.compiler.assume_constant_result
def _kernels_built() -> bool:
    """Whether the C++ kernels are usable (built on the first call); torch.compile evaluates it once, at trace
    time."""
    return _cpp.load()


def _depthwise(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
    weight = _weight_like(x, weight)
    return F.conv2d(x, weight, bias, padding=[padding[0], padding[1]], groups=weight.shape[0])


def _weight_like(x: Tensor, weight: Tensor) -> Tensor:
    """The depthwise ``weight`` as a channels-last view when ``x``'s channels are innermost (see
    :func:`depthwise_conv2d`), else itself."""
    if _channels_innermost(x) and weight.is_contiguous():
        return weight.as_strided(weight.shape, (weight.stride(0), 1, weight.stride(2), weight.stride(3)))
    return weight


def _trained(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], compiled: bool = False
) -> Tensor:
    """The training path. Eager: torch's convolution (its own autograd node, whose backward is torch's) or the
    autograd Function whose backward is ours, whichever measured faster over a forward and a backward on first use
    of the shape (:func:`~blockgraph.ops.autotune.step`); chosen at the forward, so that a recomputation
    (activation checkpointing) takes the path the forward took. Under torch.compile, the custom op
    ``blockgraph::depthwise_conv2d`` (its backward chosen without measuring, as eager's default: ours above 3x3)."""
    if compiled:  # (under autocast: in its dtype, as F.conv2d would run)
        return as_autocast_runs(_depthwise_op, (x, weight, bias), padding[0], padding[1])
    theirs, ours = partial(_depthwise, x, weight, bias, padding), partial(_depthwise_function, x, weight, bias, padding)
    candidates = {"torch": theirs, "blockgraph": ours}  # the default first: torch's up to 3x3, ours above
    if weight.shape[-1] * weight.shape[-2] > 9:
        candidates = {"blockgraph": ours, "torch": theirs}
    candidates["hybrid"] = partial(_depthwise_function, x, weight, bias, padding, weight_grad="torch")
    need = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    key = ("depthwise_conv2d_train", tuple(x.shape), tuple(weight.shape), padding, autocast_dtype(x),
           x.stride(1) == 1, need)  # fmt: skip
    return run_chosen(key, candidates, device=x.device, training=True)


def _depthwise_function(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], weight_grad: str = "cpp"
) -> Tensor:
    """The convolution through :class:`_DepthwiseConv2d` (our backward; ``weight_grad``: see :func:`_backward`), in
    autocast's dtype under autocast."""
    return as_autocast_runs(_DepthwiseConv2d.apply, (x, weight, bias), padding, weight_grad)


class _DepthwiseConv2d(torch.autograd.Function):
    """:func:`depthwise_conv2d`'s training path where ours is the faster backward: torch's forward, our backward."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], weight_grad: str
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.weight_grad = weight_grad
        return _depthwise(x, weight, bias, padding)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled() or not _cpp.load():  # create_graph: torch's formula, itself differentiable
            return (*_torch_backward(grad, x, weight, ctx.padding, need), None, None)
        return (*_backward(grad, x, weight, ctx.padding, need, ctx.weight_grad), None, None)


def depthwise_conv2d_backward(
    grad: Tensor, x: Tensor, weight: Tensor, padding: tuple[int, int], need: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """The gradients of :func:`depthwise_conv2d` (input, weight, bias: those ``need`` asks for, else None) from the
    output's ``grad``, for a backward written by hand around the convolution (CoaT's attention, ops/coat.py): torch's
    or ours, whichever measured faster for this shape on this machine (ours only when the C++ kernels are built);
    torch's differentiable formula when a graph of the backward is recorded."""
    torch_backward = partial(_torch_backward, grad, x, weight, padding, need)
    if torch.is_grad_enabled() or not _cpp.load():  # create_graph: torch's formula, itself differentiable
        return torch_backward()
    ours = partial(_backward, grad, x, weight, padding, need)
    kh, kw = weight.shape[-2:]
    candidates = {"torch": torch_backward, "blockgraph": ours}  # the default first: torch's for 3x3 and smaller
    if kh * kw > 9:
        candidates = {"blockgraph": ours, "torch": torch_backward}
    candidates["hybrid"] = partial(_backward, grad, x, weight, padding, need, "torch")
    key = ("depthwise_conv2d_backward", tuple(x.shape), tuple(weight.shape), padding, x.dtype, x.stride(1) == 1,
           grad.stride(1) == 1, need)  # fmt: skip
    return run_chosen(key, candidates, device=x.device)


@torch.library.custom_op("blockgraph::depthwise_conv2d", mutates_args=())
def _depthwise_op(x: Tensor, weight: Tensor, bias: Tensor | None, ph: int, pw: int) -> Tensor:
    """:func:`depthwise_conv2d`'s training path as torch.compile sees it: an op whose backward is ours (for kernels
    larger than 3x3; torch's otherwise), traced into the compiled backward graph."""
    return _depthwise(x, weight, bias, (ph, pw))


@_depthwise_op.register_fake
def _depthwise_op_fake(x: Tensor, weight: Tensor, bias: Tensor | None, ph: int, pw: int) -> Tensor:
    return _depthwise(x, weight, bias, (ph, pw))  # (on fake tensors: the convolution's sizes and memory format)


def _depthwise_op_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, _, ph, pw = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding = (ph, pw)


def _depthwise_op_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    need = tuple(ctx.needs_input_grad[:3])
    if weight.shape[-1] * weight.shape[-2] > 9:
        return (*_backward(grad, x, weight, ctx.padding, need), None, None)
    return (*_torch_backward(grad, x, weight, ctx.padding, need), None, None)


_depthwise_op.register_autograd(_depthwise_op_backward, setup_context=_depthwise_op_setup)


def _register_weight_grad() -> None:
    """Teach torch the C++ weight gradient's shape (fake tensors: torch.compile) and that it has no derivative."""
    torch.library.register_fake("blockgraph_conv::depthwise_weight_grad")(
        lambda grad, x, kh, kw, ph, pw: x.new_empty(x.shape[1], 1, kh, kw)
    )
    torch.library.register_autograd("blockgraph_conv::depthwise_weight_grad", _refuse_double_backward)


def _refuse_double_backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
    raise RuntimeError(
        "blockgraph_conv::depthwise_weight_grad has no derivative: a gradient of a depthwise convolution's gradient "
        "under torch.compile is not supported (eager takes torch's differentiable formula)"
    )


_cpp.after_load(_register_weight_grad)


def _torch_backward(
    grad: Tensor, x: Tensor, weight: Tensor, padding: tuple[int, int], need: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """torch's gradients of the convolution (oneDNN on the CPU), with the forward's weight strides."""
    weight = _weight_like(x, weight)
    C = weight.shape[0]
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, weight, [C], [1, 1], list(padding), [1, 1], False, [0, 0], C, list(need)
    )
    return gx, gw, gb


def _backward(
    grad: Tensor, x: Tensor, weight: Tensor, padding: tuple[int, int], need: tuple[bool, ...], weight_grad: str = "cpp"
) -> tuple[Tensor | None, ...]:
    """Ours: the input gradient as a forward convolution, the weight gradient by the C++ kernel, the bias's a sum;
    with ``weight_grad="torch"``, the weight's and the bias's by torch's backward (oneDNN's backward-weights), for
    the shapes where that is faster and torch's backward-data is not (a 3x3 over [8, 512, 56, 56] in bf16 on an
    AVX-512 EPYC: the input gradient 1.8 ms as a forward, 3.2 ms by oneDNN's backward-data; the weight gradient
    3.7 ms by oneDNN, 5.0 ms by the C++ kernel)."""
    if weight_grad == "torch":
        gx = _backward(grad, x, weight, padding, (need[0], False, False))[0] if need[0] else None
        _, gw, gb = _torch_backward(grad, x, weight, padding, (False, need[1], need[2]))
        return gx, gw, gb
    kh, kw = weight.shape[-2:]
    ph, pw = padding
    gx = gw = gb = None
    if need[0]:
        if ph <= kh - 1 and pw <= kw - 1:  # the correlation with the flipped kernel, padded by the rest of it
            gx = _depthwise(grad, weight.flip(2, 3), None, (kh - 1 - ph, kw - 1 - pw))
        else:
            gx = _torch_backward(grad, x, weight, padding, (True, False, False))[0]
    if need[1]:
        gw = torch.ops.blockgraph_conv.depthwise_weight_grad(grad, x, kh, kw, ph, pw)
    if need[2]:
        gb = grad.sum((0, 2, 3))
    return gx, gw, gb
