"""The linear layers' op: ``residual + act(x @ weight.T + bias)``, with its plain reference and two oneDNN kernels.

- Eager inference (:func:`~blockgraph.ops.kernel.eager_inference`), CPU, float32: oneDNN's matrix multiply
  (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU backend emits) with the activation or the residual
  add in its epilogue, where the reference runs a second pass over the output, on the weight packed once into
  oneDNN's blocked layout (:func:`packed_weight`); or the plain ``F.linear`` with the activation and the add in
  place, whichever is faster on this machine for this shape (measured on first use: :mod:`blockgraph.ops.autotune`;
  oneDNN by default when measuring is off).
- A graph torch.compile traces for inference (no gradients, not exporting), CPU, float32, products of at least
  :data:`COMPILED_MIN_MACS` multiply-adds: the eager inference path above, called from the graph as an opaque op of
  our own (``blockgraph::linear_inference``), where inductor without freezing would call MKL's ``addmm`` on the
  unpacked weight and the activation and the add in passes of their own.
- An eager training step (autograd recording; not compiling, tracing or exporting), CPU, float32: oneDNN's matrix
  multiply for the forward and both gradients (:class:`_OneDnnLinear`; the weight's on transposed views:
  :func:`weight_grad`), or ``F.linear``, whichever is faster here for the shape (measured over the forward and the
  backward); then the activation and the add.
- Otherwise (export, other devices and dtypes, autocast's bf16): the reference, ``F.linear``, then the activation
  and the add.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from blockgraph.ops.autotune import choose, chosen, run_chosen
from blockgraph.ops.kernel import (
    compiled_inference,
    compiled_training,
    eager_inference,
    eager_training,
    in_place,
    residual_training,
    stamp,
    symbolic_tracing,
)

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# activation module type → oneDNN post-op name (GELU's algorithm is its ``approximate``; the others have none)
_POST_OPS: dict[type, str] = {nn.ReLU: "relu", nn.SiLU: "swish", nn.Hardswish: "hardswish", nn.GELU: "gelu"}

# The eager inference path as an op a compiled graph calls (:func:`linear`): inductor runs it as an opaque call, as it
# does ``addmm``; it runs when the graph runs, eagerly, with the packed weights and the kernel choice of eager
# inference. (Inductor lowers ``mkldnn._linear_pointwise`` only for frozen weights: its lowering asserts the weight
# is a graph constant, and ``.binary`` has no fake kernel at all.)
_LIBRARY = torch.library.Library("blockgraph", "DEF")
COMPILED_MIN_MACS = 16_000_000
"""Multiply-adds from which a compiled graph calls the eager inference path (``blockgraph::linear_inference``): below
it, the op call's overhead (about 10 us) eats the gain (measured in whole graphs at batch 1, ours / timm compiled:
MobileViT-XXS 1.04-1.05 with every product an op, 0.98 with 16M; ViT-Ti 0.70 either way)."""
_LIBRARY.define(
    "linear_inference(Tensor x, Tensor weight, Tensor? bias, str post, str algorithm, Tensor? residual,"
    " Tensor? scale) -> Tensor"
)


def _linear_inference(
    x: Tensor, weight: Tensor, bias: Tensor | None, post: str, algorithm: str, residual: Tensor | None,
    scale: Tensor | None,
) -> Tensor:  # fmt: skip
    y = linear(x, weight, bias, act=post_op_module(post, algorithm), residual=residual, scale=scale)
    return y.contiguous()  # (the layout the fake kernel promises)


_LIBRARY.impl("linear_inference", _linear_inference, "CPU")


@torch.library.register_fake("blockgraph::linear_inference")
def _linear_inference_fake(
    x: Tensor, weight: Tensor, bias: Tensor | None, post: str, algorithm: str, residual: Tensor | None,
    scale: Tensor | None,
) -> Tensor:  # fmt: skip
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    act: nn.Module | None = None,
    residual: Tensor | None = None,
    scale: Tensor | None = None,
    samples: Tensor | None = None,
) -> Tensor:
    """``residual + act(F.linear(x, weight, bias))`` (``act`` and ``residual`` optional), through the fastest
    kernel allowed now (see the module docstring); ``weight`` may be a view (rows of a larger weight). Given a
    ``residual`` and no ``act``, ``scale`` (per output channel, a layer scale) multiplies the product before the add:
    in eager inference folded into a copy of the weights (:func:`scaled`); and in an eager training step
    (:func:`~blockgraph.ops.kernel.eager_training`) ``samples`` (per sample, a drop path's factors ``[B, 1, ...]``)
    too, the scale folded into the weights on every call and the add one ``addcmul``
    (:func:`~blockgraph.ops.kernel.residual_training`)."""
    assert scale is None or (residual is not None and act is None), "a scale comes with a residual, no activation"
    assert samples is None or (residual is not None and act is None), "samples come with a residual, no activation"
    if residual is not None and (scale is not None or samples is not None) and eager_training(x):
        return residual_training(partial(recorded_linear, x), weight, bias, residual, scale, samples)
    assert samples is None, "per-sample factors are for an eager training step"
    fast = eager_inference(x)
    onednn = not symbolic_tracing() and onednn_applies(x, weight)
    if onednn and not fast and compiled_inference() and x.numel() * weight.shape[0] >= COMPILED_MIN_MACS:
        post = post_op(act)
        if post is not None:
            return torch.ops.blockgraph.linear_inference(x, weight, bias, *post, residual, scale)
    if scale is not None:
        if not fast:
            return residual + recorded_linear(x, weight, bias) * scale
        weight, bias = scaled(weight, bias, scale)
    if onednn and fast:
        shapes = (tuple(x.shape), tuple(weight.shape), bias is not None, x.dtype)
        if act is None and residual is not None and residual.shape == (*x.shape[:-1], weight.shape[0]):
            fused = partial(_fused, x, weight, bias, None, residual)
            plain = partial(_plain, x, weight, bias, None, residual)
            return run_packed(("linear", "add", *shapes), weight, {"fused": fused, "plain": plain}, x.device)
        post = post_op(act) if residual is None else None
        if post is not None:
            fused = partial(_fused, x, weight, bias, post, None)
            plain = partial(_plain, x, weight, bias, act, None)
            return run_packed(("linear", *post, *shapes), weight, {"fused": fused, "plain": plain}, x.device)
    y = recorded_linear(x, weight, bias)
    if act is not None:
        y = in_place(act, y) if fast else act(y)
    if residual is None:
        return y
    return y.add_(residual) if fast else residual + y


_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""weight → (its storage address, version and packing hint when packed, the packed copy): kept while the weight
lives."""


def packed_weight(weight: Tensor, rows: int) -> Tensor:
    """``weight`` as oneDNN's matrix multiply reads it fastest: a copy in its blocked layout
    (``mkldnn._reorder_linear_weight``, what inductor's freezing makes of a frozen weight), made on first use and
    kept with the weight (``rows``: the product's rows then, a hint for the layout; any number of rows may use it).
    Unpacked, ``_linear_pointwise`` reorders the weight on every call: on a 2-core AMD EPYC without AVX-512 the packed
    product of a ViT-S layer at batch 8 takes 0.77 of MKL's time against 0.82 (ViT-S's forward, every product fused:
    0.945 against 0.979 of timm's in 15 interleaved rounds, 0.982 against 0.984 in 9). How the copy is kept:
    :func:`packed`."""
    return packed(weight, (), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows))


def packed(weight: Tensor, hint: tuple[Any, ...], reorder: Callable[[Tensor], Tensor]) -> Tensor:
    """``reorder(weight)`` (oneDNN's blocked layout of a weight: a linear's, a convolution's), made on first use and
    kept with the weight, until the weight or ``hint`` (what the layout was chosen for, when a different one would
    be chosen for another call) changes. A weight changed since (in place: a version bump; its memory replaced:
    ``load_state_dict``, ``.to()``) is packed again; a view (rows of a larger weight), an inference tensor (no version
    to check) or a non-contiguous weight is returned as it is. A write the version does not count (through ``.data``,
    which autograd does not see either, or a NumPy view) needs :func:`release_packed`, which a compiled model's
    ``train()`` and ``eval()`` call for its weights. The cost: a second copy of each such weight while it lives."""
    if weight._base is not None or weight.is_inference() or not weight.is_contiguous():
        return weight
    return _kept(_PACKED, weight, (weight.data_ptr(), weight._version, hint), lambda: reorder(weight.detach()))


def _kept(cache: WeakIdKeyDictionary, weight: Tensor, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """``make()``, kept in ``cache`` with ``weight`` (gone with it) until ``key`` changes."""
    found = cache.get(weight)
    if found is None or found[0] != key:
        found = cache[weight] = (key, make())
    return found[1]


_SCALED: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""weight → (the version and memory of the weight, bias and scale when folded, the folded weight and bias)."""


def scaled(weight: Tensor, bias: Tensor | None, scale: Tensor) -> tuple[Tensor, Tensor | None]:
    """A layer's ``weight`` and ``bias`` with the per-output-channel factors ``scale`` folded in (a layer scale
    after the layer: ``scale * layer(x)`` is the layer with these weights, up to float rounding), made on first use
    and kept with the weight until the weight, the bias or the scale changes (or :func:`release_packed`). Eager
    inference only: the copies record no gradient."""

    def fold() -> tuple[Tensor, Tensor | None]:
        with torch.inference_mode(False), torch.no_grad():  # (tensors with a version: packed() may keep a copy)
            factors = scale.detach().reshape(-1)
            folded = weight.detach() * factors.view(-1, *[1] * (weight.dim() - 1))
            return folded, None if bias is None else bias.detach() * factors

    return _kept(_SCALED, weight, stamp(weight, bias, scale), fold)


def release_packed(weights: Iterable[Tensor] | None = None) -> None:
    """Drop the packed copies of ``weights`` (of every weight when None) and their copies with a layer scale folded
    in: their next fused product makes them afresh (:func:`packed`, :func:`scaled`)."""
    if weights is None:
        _PACKED.clear()
        _SCALED.clear()
        return
    for weight in weights:
        _PACKED.pop(weight, None)
        _SCALED.pop(weight, None)


def recorded_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``, or in an eager training step (CPU, float32, no autocast) oneDNN's training kernel
    (:class:`_OneDnnLinear`) when it is the faster here, timed over the forward and the backward
    (:func:`~blockgraph.ops.autotune.step`: timing the forward alone chose oneDNN for a classifier at batch 8,
    [8, 768] x [768, 2304], 0.24 vs 0.38 ms, whose backward then copied the transposed weight: 1.66 ms a step
    against F.linear's 1.16). ``torch.fx`` records it as one call, so that a traced graph
    runs the very kernel the model runs (timm's fx test compares the two bit for bit)."""
    if onednn_applies(x, weight):
        if eager_training(x) and (x.requires_grad or weight.requires_grad):
            fused = partial(onednn_linear, x, weight, bias)
            plain = partial(F.linear, x, weight, bias)
            key = ("linear", "train", tuple(x.shape), tuple(weight.shape), bias is not None, x.dtype, x.requires_grad)
            return run_chosen(key, {"fused": fused, "plain": plain}, device=x.device, training=True)
        if (
            compiled_training(x)
            and (x.requires_grad or weight.requires_grad)
            and x.numel() * weight.shape[0] >= COMPILED_MIN_MACS
        ):
            return torch.ops.blockgraph.linear_training(x, weight, bias)
    return F.linear(x, weight, bias)


torch.fx.wrap("recorded_linear")


def onednn_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether oneDNN may compute this product (or convolution): CPU, float32, no autocast (which computes
    ``F.linear`` in bf16: ours would stay in float32)."""
    return (
        _ONEDNN
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` recorded by autograd as oneDNN's training kernel (:class:`_OneDnnLinear`): CPU, float32."""
    return _OneDnnLinear.apply(x, weight, bias)


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` for an eager training step through oneDNN's matrix multiply: the forward ``x @ W.T + b``, the
    input's gradient ``g @ W`` (a linear map by ``W.T``) and the weight's gradient ``g.T @ x``
    (:func:`weight_grad`) run ``mkldnn._linear_pointwise``, which on the CPUs measured here takes about half of MKL's
    ``addmm``/``mm`` time at these models' shapes. The same tensors are saved as ``F.linear`` saves. When the
    backward itself is recorded (``create_graph=True``: a second derivative), the gradients are computed with
    differentiable ops instead."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_product(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # a second derivative: an op autograd can differentiate
                grad_x = grad.matmul(weight)
            else:
                grad_x = _onednn_product(grad, weight.t(), None)
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            rows = x.reshape(-1, x.shape[-1])
            grad_w = flat.t().mm(rows) if torch.is_grad_enabled() else weight_grad(flat, rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b


def _onednn_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` through oneDNN's matrix multiply, both made contiguous (a copy when one is not: the
    input's gradient passes ``weight.t()``, a weight-sized copy each backward; reading it through its strides instead
    was equal or faster natively but 1.67x slower capped at AVX2 for ViT-B's fc1)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")


def weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad.T @ x`` (a linear layer's weight gradient, ``[out, in]``, from ``[rows, out]`` and ``[rows, in]``):
    oneDNN's matrix multiply on the transposed views (:func:`_onednn_weight_grad`) or MKL's ``mm``, whichever
    measured faster here for the shape (:mod:`blockgraph.ops.autotune`; oneDNN's by default). On the AVX-512 EPYC
    oneDNN's took 0.43-0.78 of ``mm``'s time at the reference models' 18 shapes measured (ViT-B's fc1 [1576, 768] ->
    3072: 20.9 vs 35.2 ms, InceptionNeXt's 1x1 convolution at 56x56, [25088, 384] -> 96: 6.7 vs 11.3 ms; 2 threads);
    with torch's and oneDNN's kernels capped at AVX2, 0.89-2.0 (ViT-B's fc1 74.6 vs 37.3 ms)."""
    grad, x = grad.contiguous(), x.contiguous()
    if grad.shape[0] == 0:
        return grad.new_zeros(grad.shape[1], x.shape[1])
    candidates = {"onednn": partial(_onednn_weight_grad, grad, x), "mm": partial(torch.mm, grad.t(), x)}
    return run_chosen(("linear_weight_grad", tuple(grad.shape), tuple(x.shape), x.dtype), candidates, device=x.device)


def _onednn_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad.T @ x`` through oneDNN's matrix multiply on the transposed views of the two (contiguous) operands: the
    wider one on oneDNN's weight side (its ``N``), which reads it through its strides, the faster of the two orders in
    15 of 18 shapes measured. torch's wrapper copies the other, the narrower operand's transpose (``[in, rows]`` of
    ViT-B's fc1, [768, 1576]), and with ``x`` the narrower the result is transposed into place (a weight-sized copy):
    both inside the times the choice in :func:`weight_grad` measures."""
    if x.shape[1] >= grad.shape[1]:
        return torch.ops.mkldnn._linear_pointwise(grad.t(), x.t(), None, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x.t(), grad.t(), None, "none", [], "").t().contiguous()


@torch.library.custom_op("blockgraph::linear_training", mutates_args=(), device_types="cpu")
def _linear_training(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`recorded_linear` in a graph torch.compile traces for training (products of at least
    :data:`COMPILED_MIN_MACS` multiply-adds): :class:`_OneDnnLinear` as an op with its backward, traced into the
    compiled backward graph (``blockgraph::linear_grad_input``, ``blockgraph::linear_grad_weight``), where inductor
    would run MKL's ``mm`` for the forward and both gradients. Not measured against ``F.linear`` (a traced graph
    cannot time candidates): the eager step's measurements chose oneDNN's kernel at every product of at least 16M
    multiply-adds in the reference models (ViT, Swin, PVT-v2, MobileViT, CoaT: about 0.5-0.6 of ``F.linear``'s
    forward and backward time), ``F.linear`` only for a few products below it (classifiers at batch 8)."""
    return _onednn_product(x, weight, bias)


@_linear_training.register_fake
def _linear_training_fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("blockgraph::linear_grad_input", mutates_args=(), device_types="cpu")
def _linear_grad_input(grad: Tensor, weight: Tensor) -> Tensor:
    """The input's gradient of ``blockgraph::linear_training``: ``grad @ weight`` through oneDNN."""
    return _onednn_product(grad, weight.t(), None)


@_linear_grad_input.register_fake
def _linear_grad_input_fake(grad: Tensor, weight: Tensor) -> Tensor:
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


@torch.library.custom_op("blockgraph::linear_grad_weight", mutates_args=(), device_types="cpu")
def _linear_grad_weight(grad: Tensor, x: Tensor) -> Tensor:
    """The weight's gradient of ``blockgraph::linear_training``: :func:`weight_grad` over the rows."""
    return weight_grad(grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]))


@_linear_grad_weight.register_fake
def _linear_grad_weight_fake(grad: Tensor, x: Tensor) -> Tensor:
    return grad.new_empty((grad.shape[-1], x.shape[-1]))


def _linear_training_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_training_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    x, weight = ctx.saved_tensors
    grad_x = torch.ops.blockgraph.linear_grad_input(grad, weight) if ctx.needs_input_grad[0] else None
    grad_w = torch.ops.blockgraph.linear_grad_weight(grad, x) if ctx.needs_input_grad[1] else None
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


_linear_training.register_autograd(_linear_training_backward, setup_context=_linear_training_setup)


def run_packed(key: tuple[Any, ...], weight: Tensor, candidates: dict[str, Any], device: torch.device) -> Tensor:
    """The eager inference candidate chosen for ``key`` run (the candidate named ``fused`` reads ``weight``'s packed
    copy: :func:`packed`); when it is measured now and the fused one loses, that copy (made to time it) is dropped,
    so that only weights the fused kernel reads keep one."""
    measured = chosen(key, device=device) is None
    name = choose(key, candidates, device=device)
    if measured and name != "fused":
        _PACKED.pop(weight, None)
    return candidates[name]()


def _fused(
    x: Tensor, weight: Tensor, bias: Tensor | None, post: tuple[str, str] | None, residual: Tensor | None
) -> Tensor:
    """The fused eager inference kernel: oneDNN's matrix multiply on the packed weight (:func:`packed_weight`) with
    the post-op ``post`` (oneDNN's name and algorithm) or the add of ``residual`` in its epilogue."""
    packed = packed_weight(weight, x.numel() // max(x.shape[-1], 1))
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
    assert post is not None
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, post[0], [], post[1])


def _plain(x: Tensor, weight: Tensor, bias: Tensor | None, act: nn.Module | None, residual: Tensor | None) -> Tensor:
    """The plain eager inference kernel: ``F.linear``, then the activation in place and the add in place."""
    y = F.linear(x, weight, bias)
    if act is not None:
        y = in_place(act, y)
    return y if residual is None else y.add_(residual)


def post_op(act: nn.Module | None) -> tuple[str, str] | None:
    """oneDNN's name and algorithm for ``act`` (``("none", "")`` for none), or None if oneDNN has no such post-op."""
    if act is None or isinstance(act, nn.Identity):
        return "none", ""
    name = _POST_OPS.get(type(act))
    if name is None:
        return None
    return name, act.approximate if isinstance(act, nn.GELU) else ""


@functools.cache
def post_op_module(post: str, algorithm: str) -> nn.Module | None:
    """The activation module oneDNN's post-op ``post`` with ``algorithm`` computes (the inverse of :func:`post_op`;
    None for ``"none"``)."""
    if post == "none":
        return None
    if post == "gelu":
        return nn.GELU(approximate=algorithm)
    return next(module for module, name in _POST_OPS.items() if name == post)()
