"""Inference kernels: the blocks' math with fewer passes over memory, for eager inference.

The blocks call these when :func:`enabled` says so: the module is in eval mode, nothing records gradients
(``torch.no_grad()`` or ``torch.inference_mode()``), and torch runs eagerly (not compiling: inductor fuses by itself;
not exporting or tracing: exported graphs keep standard ops). Otherwise the blocks run their plain layers, so
training, autograd, ``torch.compile`` and ONNX see the modules' own ops, with two exceptions that every path may
take: :class:`Linear` (in graphs compiled for inference) and :func:`depthwise_conv2d`.

- :func:`linear`: on the CPU in float32, oneDNN's matrix multiply (``torch.ops.mkldnn._linear_pointwise``, the op
  inductor's CPU backend emits) with the activation or the residual add done in its epilogue, where the plain path
  would run a second pass over the output. Elsewhere ``F.linear`` then the activation / add in place.
- :class:`Linear` (every ``linear`` layer of the blocks): ``nn.Linear`` whose forward, while torch.compile traces
  for inference (no gradients), runs large matrix multiplies through oneDNN as well (:func:`dense`): inductor
  without freezing lowers ``F.linear`` to MKL's ``addmm``, 5-28% slower on these machines' shapes.
- :func:`merged_depthwise`: depthwise convolutions over consecutive channel groups (CoaT's CRPE windows) as one,
  cached; :func:`merge_depthwise` builds it with differentiable ops, for the plain path too (training, compile).
- :func:`depthwise_conv2d`: a depthwise convolution of a map viewed from tokens, its weight viewed channels-last so
  that oneDNN never copies the map to NCHW (which it did at batch 1, eagerly and compiled).
- :func:`conv_bn`: Conv2d → BatchNorm2d (eval: an affine map per channel) → activation as one convolution whose
  weight and bias have the BatchNorm folded in, the activation applied in place. The folded pair is kept on the
  convolution and made again whenever any of the six tensors changes (version counter or storage), so an optimizer
  step, ``load_state_dict`` or ``.to()`` is always seen. On the CPU the folded weight is channels-last: oneDNN's
  convolutions then skip the layout reorders of every input and output (2x faster on large depthwise maps), and
  the maps that follow stay channels-last (views and ``flatten(2).transpose(1, 2)`` to tokens are free).

Results equal the plain path's up to float rounding (a different summation order: within 1e-5 of timm's twins on
every reference model, guarded by tests/blocks/test_optimizations.py). The folded weights cost one copy of the
convolution weights of the Conv-BN layers, made on the first eval forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockgraph.ops.ms_deform_attn import exporting

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# activation module type → oneDNN post-op name (GELU's algorithm is its ``approximate``; the others have none)
_POST_OPS: dict[type, str] = {nn.ReLU: "relu", nn.SiLU: "swish", nn.Hardswish: "hardswish", nn.GELU: "gelu"}


def enabled(module: nn.Module) -> bool:
    """Whether ``module`` may run the fused kernels now: eval mode, no gradients recorded, eager torch."""
    return not (
        module.training
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or exporting()
    )


def _post_op(act: nn.Module | None) -> tuple[str, str] | None:
    """oneDNN's name and algorithm for ``act`` (``("none", "")`` for none), or None if oneDNN has no such post-op."""
    if act is None or isinstance(act, nn.Identity):
        return "none", ""
    name = _POST_OPS.get(type(act))
    if name is None:
        return None
    return name, act.approximate if isinstance(act, nn.GELU) else ""


def _in_place(act: nn.Module, y: Tensor) -> Tensor:
    """``act(y)``, overwriting ``y`` where the activation has an in-place form."""
    if isinstance(act, nn.ReLU):
        return F.relu_(y)
    if isinstance(act, nn.SiLU):
        return F.silu(y, inplace=True)
    if isinstance(act, nn.Hardswish):
        return F.hardswish(y, inplace=True)
    return act(y)


def linear(
    x: Tensor, layer: nn.Linear, act: nn.Module | None = None, residual: Tensor | None = None, rows: slice | None = None
) -> Tensor:
    """``act(layer(x))``, or ``residual + layer(x)`` (not both), in one pass over the output where oneDNN can;
    ``rows``: only these output features (a view of the weight's rows, no copy).

    For eager inference only (:func:`enabled`): the fused op has no autograd formula.
    """
    w, b = layer.weight, layer.bias
    if rows is not None:
        w, b = w[rows], None if b is None else b[rows]
    if _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32:
        if residual is not None and act is None and residual.shape[-1] == w.shape[0]:
            if residual.shape == x.shape[:-1] + residual.shape[-1:]:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")
        elif residual is None:
            post = _post_op(act)
            if post is not None:
                return torch.ops.mkldnn._linear_pointwise(x, w, b, post[0], [], post[1])
    y = F.linear(x, w, b)
    if act is not None:
        y = _in_place(act, y)
    return y if residual is None else y.add_(residual)


# oneDNN's matrix multiply as an op of our own: inductor lowers ``mkldnn._linear_pointwise`` only for frozen weights
# (its lowering asserts the weight is a graph constant; ``.binary`` has no fake kernel at all), so the graph calls
# this one, which inductor runs as an opaque call, as it does ``addmm``.
_LIBRARY = torch.library.Library("blockgraph", "DEF")
_LIBRARY.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl(
    "onednn_linear", lambda x, weight, bias: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""), "CPU"
)
torch.library.register_fake("blockgraph::onednn_linear")(
    lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0]))
)

COMPILED_ONEDNN_MIN_MACS = 64_000_000
"""Multiply-adds from which :func:`dense` calls oneDNN in a compiled graph. Measured ratios oneDNN / inductor's
``addmm`` (2 threads, float32, rows x in x out): 197x768x3072 0.72, 785x320x960 0.90-0.97, 197x384x1152 0.92-0.96;
below, the op call's overhead eats the gain: 3137x64x192 0.96-1.01, 1024x96x288 0.95-1.06, 64x144x432 1.27."""


def dense(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; while torch.compile traces for inference on the CPU in float32 and the product
    has at least :data:`COMPILED_ONEDNN_MIN_MACS` multiply-adds, through oneDNN (``blockgraph::onednn_linear``, no
    autograd formula: never while gradients are recorded, nor for export, where graphs keep standard ops)."""
    if (
        _ONEDNN
        and torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() or exporting())
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() * weight.shape[0] >= COMPILED_ONEDNN_MIN_MACS
    ):
        return torch.ops.blockgraph.onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`dense`: the same parameters, state_dict and results (within float
    rounding); faster under torch.compile for inference."""

    def forward(self, x: Tensor) -> Tensor:
        return dense(x, self.weight, self.bias)


def _stamp(*tensors: Tensor | None) -> tuple:
    return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


def _remember(owner: nn.Module, attr: str, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, kept on ``owner`` (a plain attribute: not a buffer, not in the state_dict) until ``key`` changes."""
    cached = owner.__dict__.get(attr)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = make()
    owner.__dict__[attr] = (key, value)
    return value


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels_last: bool) -> tuple[Tensor, Tensor]:
    """``conv``'s weight and bias with the eval-mode ``bn`` folded in (cached on ``conv`` until a tensor changes).

    ``bn(conv(x)) = conv(x) * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``, so the weight's output
    channel ``o`` scales by ``s[o]`` and the bias is ``(b - mean) * s + beta``.
    """
    key = (
        _stamp(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var),
        bn.eps,
        channels_last,
    )
    return _remember(conv, "_blockgraph_folded", key, lambda: _fold(conv, bn, channels_last))


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels_last: bool) -> tuple[Tensor, Tensor]:
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


def merged_depthwise(convs: Sequence[nn.Conv2d]) -> tuple[Tensor, Tensor | None] | None:
    """:func:`merge_depthwise`, cached on the first convolution until a tensor changes: for eager inference, where
    the weights do not change between calls."""
    layouts = tuple(
        (c.in_channels, c.out_channels, c.groups, c.kernel_size, c.padding, c.stride, c.dilation, c.padding_mode)
        for c in convs
    )
    key = (layouts, _stamp(*(t for conv in convs for t in (conv.weight, conv.bias))))
    return _remember(convs[0], "_blockgraph_merged", key, lambda: merge_depthwise(convs))


def merge_depthwise(convs: Sequence[nn.Conv2d]) -> tuple[Tensor, Tensor | None] | None:
    """One depthwise convolution equal to ``torch.cat([conv(part) for conv, part in zip(convs, parts)], 1)`` over
    consecutive channel parts: each kernel zero-padded (centered) to the largest, so each output is the same sum
    plus exact zeros. None unless every convolution is depthwise with an odd square kernel, stride and dilation 1
    and 'same' zero padding.

    Built from the weights with differentiable ops (pad, concatenate): gradients reach each convolution's own
    weight and bias, so training and torch.compile use it too (inductor: CoaT-Tiny compiled at batch 1 0.93-0.96
    of timm's, 0.95-1.01 with the split convolutions). One launch instead of a split, one per kernel size and a
    concatenation (CoaT's CRPE: 1.2 ms instead of 6.6 ms at stage 1 of CoaT-Lite, batch 8; the padded taps cost
    less than the copies they save).
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
            return None
    size = max(conv.kernel_size[0] for conv in convs)
    weight = torch.cat([F.pad(c.weight, [(size - c.kernel_size[0]) // 2] * 4) for c in convs])
    bias = None
    if any(conv.bias is not None for conv in convs):
        bias = torch.cat([c.weight.new_zeros(c.out_channels) if c.bias is None else c.bias for c in convs])
    return weight, bias


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int | tuple[int, int]) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, groups=C)`` for a depthwise weight ``[C, 1, kh, kw]``. When
    ``x``'s channels are its innermost dim (a map viewed from tokens ``[B, N, C]``), the weight goes in as a view
    with channels-last strides: the same memory (only its size-1 dim's stride differs), so autograd and every path
    may use it.

    oneDNN then runs its channels-last kernel on ``x`` as it is, whatever the strides of ``x``'s size-1 dims. At
    batch 1 (eager views, and inductor's under torch.compile) the batch dim's stride makes ``suggest_memory_format``
    read such a map as channels-first, so with the plain weight the convolution copied its input to NCHW and ran
    NCHW's depthwise kernel: 0.36 vs 0.13 ms eagerly for 3x3 over 320 channels at 28x28, 0.8-1.2 ms plus a
    0.2-0.4 ms copy compiled. At larger batches both weights give the same kernel and bits. A channels-first ``x``
    keeps the plain weight (its kernel and results unchanged).
    """
    if x.stride(1) == 1 and x.shape[1] > 1 and weight.is_contiguous():
        weight = weight.as_strided(weight.shape, (weight.stride(0), 1, weight.stride(2), weight.stride(3)))
    return F.conv2d(x, weight, bias, padding=padding, groups=weight.shape[0])


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module | None = None) -> Tensor:
    """``act(bn(conv(x)))`` as one convolution with the (eval-mode) BatchNorm folded in, the activation in place.

    For eager inference only (:func:`enabled`). A BatchNorm without running statistics (it normalizes by the batch
    even in eval) or a convolution with padding modes other than zeros runs the plain layers.
    """
    if bn.running_mean is None or conv.padding_mode != "zeros":
        y = bn(conv(x))
    else:
        weight, bias = folded(conv, bn, channels_last=x.device.type == "cpu")
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return y if act is None else _in_place(act, y)
