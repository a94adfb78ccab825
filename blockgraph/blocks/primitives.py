"""Primitive ops: the single layers (conv2d, linear, norm, act, pool, upsample, layer_scale, dropout, drop_path) and
the dataflow joints (add, sub, mul, concat, split, identity) from which a spec composes a block of its own (a
ConvNeXt, PoolFormer, PVT-v2 or InceptionNeXt block), each with timm's semantics and parameter names.

Channels are dim 1 of an image map ``[B, C, h, w]`` and the last dim of tokens ``[B, N, C]`` and vectors ``[B, C]``;
an op that works "over channels" works on each of these layouts. Where an op has an optional ``dim``, it is the
input's channels: checked against the input when given, taken from it when not.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, Name, register
from blockgraph.types import Expr, TensorType


def _per_axis(least: int, also: tuple[str, ...] = ()) -> Any:
    """A validator run before the union's own: one clear error for a value that is neither an int ``>= least`` nor
    a pair of them (nor one of ``also``), rather than one error per member of the union."""

    def check(value: Any) -> Any:
        def whole(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= least

        pair_ok = isinstance(value, list | tuple) and len(value) == 2 and all(whole(v) for v in value)
        if not (whole(value) or pair_ok or value in also):
            kind = "a positive int" if least > 0 else "an int >= 0"
            extra = "".join(f", or `{a}`" for a in also)
            raise PydanticCustomError("per_axis", f"expected {kind} or a pair [h, w] of them{extra}")
        return value

    return BeforeValidator(check)


Size2 = Annotated[PositiveInt | tuple[PositiveInt, PositiveInt], _per_axis(1)]
"""A size per spatial axis: one int for both, or ``[h, w]``."""
Pad2 = Annotated[NonNegativeInt | tuple[NonNegativeInt, NonNegativeInt], _per_axis(0)]
"""A zero padding per side along each axis: one int for both, or ``[h, w]``."""
ConvPad = Annotated[NonNegativeInt | tuple[NonNegativeInt, NonNegativeInt] | Literal["same"], _per_axis(0, ("same",))]
"""A convolution's padding: as :data:`Pad2`, or ``same``."""
CHANNELS = ("image", "tokens", "vector")
"""The layouts with channels an op can work over."""


def pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` from an int (both axes) or a pair."""
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _grid(x: TensorType) -> tuple[Expr, Expr]:
    assert x.grid is not None, "a map or tokens type has a grid"
    return x.grid


# ------------------------------------------------------------------------------------------------------------ layers


@register
class Conv2dSpec(BlockSpec):
    """A 2-d convolution of an image map (``nn.Conv2d``, as timm's ``create_conv2d`` with static padding)."""

    op: Literal["conv2d"]
    takes_act: ClassVar[bool] = True
    takes_residual: ClassVar[bool] = True
    dim_out: PositiveInt
    """Output channels."""
    kernel: Size2
    """Kernel size: an int (square) or ``[kh, kw]``."""
    stride: Size2 = 1
    """Stride: an int or ``[sh, sw]``."""
    padding: ConvPad | None = None
    """Zero padding per side: an int, ``[ph, pw]``, or ``same`` (TensorFlow's: the map keeps its size; only where
    that padding is the same on both sides, at stride 1 with ``dilation * (kernel - 1)`` even). Default:
    ``dilation * (kernel - 1) // 2`` per axis (timm's ``get_padding`` at stride 1): the map keeps its size at stride
    1 for odd kernels; write ``padding: 0`` for a patchify conv (kernel = stride)."""
    dilation: Size2 = 1
    """Spacing of the kernel taps: an int or ``[dh, dw]``."""
    groups: PositiveInt = 1
    """Convolution groups; they must divide the input and output channels (= channels: depthwise)."""
    bias: bool = True
    """Learn a bias."""
    dim: PositiveInt | None = None
    """Input channels (default: the input's)."""

    def paddings(self) -> tuple[int | None, int | None]:
        """The padding per axis, resolved; None for an axis where ``same`` would pad the two sides unevenly."""
        if isinstance(self.padding, int | tuple):
            return pair(self.padding)
        pads: list[int | None] = []
        for k, s, d in zip(pair(self.kernel), pair(self.stride), pair(self.dilation), strict=True):
            even = s == 1 and d * (k - 1) % 2 == 0
            pads.append(d * (k - 1) // 2 if self.padding is None or even else None)
        return pads[0], pads[1]

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image", channels=self.dim)
        ctx.divides(x.channels, self.groups, field="groups", what="group", of="input channels")
        ctx.divides(self.dim_out, self.groups, field="groups", what="group", of="dim_out")
        pads = self.paddings()
        if None in pads:
            ks, ss, ds = pair(self.kernel), pair(self.stride), pair(self.dilation)
            explicit = [d * (k - 1) // 2 for k, d in zip(ks, ds, strict=True)]
            ctx.fail(
                f"`padding: same` with kernel {list(ks)}, stride {list(ss)}, dilation {list(ds)} would pad the two "
                "sides unevenly (or by an amount that depends on the input size)",
                field="padding",
                hint=f"write the padding per side, e.g. `padding: {explicit}`, or use stride 1 with an odd kernel",
            )
        grid = _grid(x)
        h, w = (
            ctx.conv_out(size, k, s, p, d, field="kernel")  # type: ignore[arg-type]  # no None past the check
            for size, k, s, p, d in zip(
                grid, pair(self.kernel), pair(self.stride), pads, pair(self.dilation), strict=True
            )
        )
        return TensorType.image(self.dim_out, h, w)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.primitives import Conv2d

        fields = self.fields("dim", "kernel", "stride", "padding", "dilation")
        kernel, stride, dilation = pair(self.kernel), pair(self.stride), pair(self.dilation)
        ph, pw = self.paddings()
        assert ph is not None and pw is not None, "the shape rule rejects an uneven `same`"
        padding = (ph, pw)
        return Conv2d(x.channels, kernel=kernel, stride=stride, padding=padding, dilation=dilation, **fields, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.conv(x.channels, self.dim_out, pair(self.kernel), self.groups, self.bias)


@register
class LinearSpec(BlockSpec):
    """A linear map of the channels (``nn.Linear``) of tokens, a vector, or an image map. On a map it is timm's
    ``Linear`` on a channels-last view: permute to ``[B, h, w, C]``, linear, permute back (the result is an NCHW
    tensor in channels-last memory, which the next channel op reads without a copy): ConvNeXt's MLP."""

    op: Literal["linear"]
    takes_act: ClassVar[bool] = True
    takes_residual: ClassVar[bool] = True
    dim_out: PositiveInt
    """Output channels."""
    bias: bool = True
    """Learn a bias."""
    dim: PositiveInt | None = None
    """Input channels (default: the input's)."""

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout=CHANNELS, channels=self.dim)
        return x.with_(channels=self.dim_out)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.primitives import linear

        return linear(dim=x.channels, layout=x.layout, **self.fields("dim"), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.linear(x.channels, self.dim_out, self.bias)


@register
class ClassifierSpec(BlockSpec):
    """A model's classifier on a vector of features: ``nn.Linear(C, num_classes)``, or, with ``num_classes: 0``,
    the identity (the features themselves, timm's convention; then on any layout). The model's ``get_classifier()`` returns it and
    ``reset_classifier(n)`` replaces it; ``forward_head(x, pre_logits=True)`` stops before it."""

    op: Literal["classifier"]
    num_classes: NonNegativeInt
    """Classes (output channels); 0: no classifier, the features pass through."""
    bias: bool = True
    """Learn a bias."""

    is_classifier = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        if self.num_classes:  # 0 classes: the identity, on any layout (the unpooled features)
            ctx.expect(x, layout="vector")
        return x.with_(channels=self.num_classes or x.channels)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.heads import classifier

        return classifier(x.channels, self.num_classes, bias=self.bias, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.linear(x.channels, self.num_classes, self.bias) if self.num_classes else 0


NormKind = Literal["layer", "batch", "group", "rms"]
_NORM_LAYOUTS: dict[str, tuple[str, ...]] = {
    "layer": CHANNELS,
    "batch": ("image", "vector"),
    "group": ("image",),
    "rms": CHANNELS,
}


@register
class NormSpec(BlockSpec):
    """A normalization layer: ``layer`` (LayerNorm over the channels; timm's ``LayerNorm2d`` on a map), ``batch``
    (BatchNorm2d on a map, BatchNorm1d on a vector), ``group`` (GroupNorm on a map; ``groups: 1`` is timm's
    ``GroupNorm1``, PoolFormer's norm) or ``rms`` (RMSNorm over the channels; timm's ``RmsNorm``/``RmsNorm2d``).
    Parameters ``weight`` and ``bias`` (RMSNorm: ``weight`` only; BatchNorm's running statistics are buffers), so
    timm's keys map one to one."""

    op: Literal["norm"]
    kind: NormKind
    """Which normalization: ``layer``, ``batch``, ``group`` or ``rms``."""
    eps: PositiveFloat = 1e-5
    """Epsilon added to the variance (torch's default; timm's ConvNeXt, PoolFormer and many others use 1e-6: write
    what the model you reproduce uses)."""
    groups: PositiveInt = 1
    """Groups of ``kind: group`` (they must divide the channels); 1 normalizes over all channels and positions."""
    affine: bool = True
    """Learn a per-channel scale (``weight``) and shift (``bias``; none for ``rms``)."""
    dim: PositiveInt | None = None
    """Input channels (default: the input's)."""

    def uses_batch_norm(self) -> bool:
        return self.kind == "batch"

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        layouts = _NORM_LAYOUTS[self.kind]
        if x.layout not in layouts:
            ctx.fail(
                f"`kind: {self.kind}` normalizes {' or '.join(layouts)}, got {x.layout} {x}",
                field="kind",
                hint="`kind: layer` or `kind: rms` normalize the channels of any of image, tokens or vector"
                if self.kind != "layer"
                else None,
            )
        ctx.expect(x, channels=self.dim)
        if self.kind == "group":
            ctx.divides(x.channels, self.groups, field="groups", what="group", of="channels")
        elif self.groups != 1:
            ctx.fail(f"`groups` applies to `kind: group`, not `kind: {self.kind}`", field="groups", hint="remove it")
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.primitives import norm

        return norm(dim=x.channels, layout=x.layout, **self.fields("dim"), **ctx.dd)

    def params(self, x: TensorType) -> int:
        if self.kind == "rms":
            return count.rms_norm(x.channels, self.affine)
        return count.norm(x.channels, self.affine)


ActKind = Literal["gelu", "gelu_tanh", "relu", "relu6", "silu", "hardswish", "sigmoid", "tanh", "star_relu", "identity"]


@register
class ActSpec(BlockSpec):
    """An activation function, elementwise, on any layout. ``gelu`` is the exact (erf) form, ``gelu_tanh`` its tanh
    approximation; ``star_relu`` is MetaFormer's StarReLU ``scale * relu(x)**2 + bias`` with a learned scalar
    ``scale`` (init 1) and ``bias`` (init 0) (Yu et al., "MetaFormer Baselines for Vision", 2022)."""

    op: Literal["act"]
    kind: ActKind
    """Which activation."""

    def fusable(self) -> bool:
        return self.kind != "star_relu"  # (learned parameters: no kernel's epilogue computes it)

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.primitives import act

        return act(**self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return 2 if self.kind == "star_relu" else 0


@register
class DropoutSpec(BlockSpec):
    """Dropout (``nn.Dropout``) on any layout: in training, zeroes each element with probability ``rate`` and
    scales the others by ``1 / (1 - rate)``; the identity in eval."""

    op: Literal["dropout"]
    rate: Rate = 0.0
    """Probability of zeroing an element (training only)."""

    dropout_rate_field = "rate"

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        return x

    def passes_residual_branch(self) -> bool:
        return True

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from torch import nn

        return nn.Dropout(self.rate)

    def params(self, x: TensorType) -> int:
        return 0


@register
class DropPathSpec(BlockSpec):
    """Stochastic depth on any layout: in training, zeroes a whole sample with probability ``rate`` and scales the
    kept ones by ``1 / (1 - rate)`` (timm's ``DropPath``; put it at the end of a residual branch, before the
    ``add``)."""

    op: Literal["drop_path"]
    rate: Rate = 0.0
    """Probability of dropping a sample's branch (training only)."""

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        return x

    def passes_residual_branch(self) -> bool:
        return True

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.common import DropPath

        return DropPath(self.rate)

    def params(self, x: TensorType) -> int:
        return 0


@register
class PoolSpec(BlockSpec):
    """Average or max pooling of an image map (``nn.AvgPool2d``/``nn.MaxPool2d``); or, with ``global: true``,
    over all positions of a map (timm's adaptive pooling to 1x1 then flatten) or of tokens without extra tokens,
    giving a vector ``[B, C]``."""

    op: Literal["pool"]
    kind: Literal["avg", "max"] = "avg"
    """Average or maximum."""
    kernel: Size2 | None = None
    """Window size: an int or ``[kh, kw]``; required unless ``global``."""
    stride: Size2 | None = None
    """Stride: an int or ``[sh, sw]``; default: the kernel (windows that tile the map)."""
    padding: Pad2 = 0
    """Padding per side (at most half the window; average pooling counts it as zeros unless
    ``count_include_pad: false``, max pooling ignores it)."""
    ceil_mode: bool = False
    """Round the output size up (a last, partial window) rather than down; needs ``stride + padding <= kernel``."""
    count_include_pad: bool = True
    """Average pooling: divide by the whole window, padding included (torch's default); false divides by the
    positions inside the map (PoolFormer)."""
    global_: bool = Field(default=False, alias="global")
    """Pool over all positions: a map or tokens become a vector ``[B, C]``."""

    def pools_globally(self) -> bool:
        return self.global_

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        if self.kind == "max" and not self.count_include_pad:
            ctx.fail("`count_include_pad` applies to `kind: avg`", field="count_include_pad", hint="remove it")
        if self.global_:
            ctx.expect(x, layout=("image", "tokens"), extra=0 if x.layout == "tokens" else None)
            for name in ("kernel", "stride", "padding", "ceil_mode"):
                if name in self.model_fields_set:
                    ctx.fail(f"`{name}` does not apply to global pooling", field=name, hint="remove it")
            return TensorType.vector(x.channels)
        ctx.expect(x, layout="image")
        if self.kernel is None:
            ctx.fail("pooling needs a `kernel` (or `global: true`)", field="op", hint="add `kernel: 3`, say")
        ks, ss, ps = pair(self.kernel), pair(self.stride or self.kernel), pair(self.padding)
        for k, s, p in zip(ks, ss, ps, strict=True):
            if 2 * p > k:
                ctx.fail(f"padding {p} is more than half the window {k}", field="padding", hint=f"use {k // 2} or less")
            if self.ceil_mode and s + p > k:
                ctx.fail(
                    f"`ceil_mode` with stride {s} + padding {p} > kernel {k} is not supported (a last window may "
                    "start in the padding, which torch then drops)",
                    field="ceil_mode",
                    hint="use `ceil_mode: false`, or a stride and padding that add up to at most the kernel",
                )
        h, w = (self._out(ctx, size, k, s, p) for size, k, s, p in zip(_grid(x), ks, ss, ps, strict=True))
        return TensorType.image(x.channels, h, w)

    def _out(self, ctx: InferContext, size: Expr, k: int, s: int, p: int) -> Expr:
        out = ctx.conv_out(size, k, s, p, field="kernel")
        return (size + 2 * p - k + s - 1) // s + 1 if self.ceil_mode else out

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.primitives import pool

        fields = self.fields("kernel", "stride", "padding")
        if self.global_:
            return pool(layout=x.layout, **fields)
        kernel = pair(self.kernel)  # type: ignore[arg-type]  # the shape rule checked it is given
        stride, padding = pair(self.stride or kernel), pair(self.padding)
        return pool(layout=x.layout, kernel=kernel, stride=stride, padding=padding, **fields)

    def params(self, x: TensorType) -> int:
        return 0


@register
class UpsampleSpec(BlockSpec):
    """Resize an image map (``nn.Upsample``) by an integer ``scale`` or to a fixed ``size``."""

    op: Literal["upsample"]
    mode: Literal["nearest", "bilinear"] = "nearest"
    """Interpolation."""
    scale: PositiveInt | None = None
    """Multiply the height and width by this."""
    size: tuple[PositiveInt, PositiveInt] | None = None
    """The output ``[h, w]``, whatever the input's."""
    align_corners: bool = False
    """``bilinear`` only: align the corner pixels of input and output (torch's ``align_corners``)."""

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image")
        if (self.scale is None) == (self.size is None):
            ctx.fail("give exactly one of `scale` and `size`", field="op", hint="`scale: 2`, or `size: [14, 14]`")
        if self.align_corners and self.mode != "bilinear":
            ctx.fail("`align_corners` applies to `mode: bilinear`", field="align_corners", hint="remove it")
        if self.size is not None:
            return TensorType.image(x.channels, *self.size)
        h, w = _grid(x)
        return TensorType.image(x.channels, h * self.scale, w * self.scale)  # type: ignore[operator]

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.primitives import upsample

        return upsample(**self.fields())

    def params(self, x: TensorType) -> int:
        return 0


@register
class LayerScaleSpec(BlockSpec):
    """A learned per-channel scale ``gamma`` (init ``init``) (Touvron et al., "Going deeper with Image
    Transformers", 2021): timm's ``LayerScale`` on tokens and vectors, ``LayerScale2d`` on maps."""

    op: Literal["layer_scale"]
    init: float = 1e-5
    """Initial value of every channel's scale."""
    dim: PositiveInt | None = None
    """Input channels (default: the input's)."""

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout=CHANNELS, channels=self.dim)
        return x

    def passes_residual_branch(self) -> bool:
        return True

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.primitives import layer_scale

        return layer_scale(dim=x.channels, layout=x.layout, **self.fields("dim"), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return x.channels


@register
class IdentitySpec(BlockSpec):
    """Passes its input through (``nn.Identity``), on any layout: a named point of the graph."""

    op: Literal["identity"]

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from torch import nn

        return nn.Identity()

    def params(self, x: TensorType) -> int:
        return 0


# ------------------------------------------------------------------------------------------------------- joints


def _at_least_two(ctx: InferContext, xs: tuple[TensorType, ...]) -> None:
    if len(xs) < 2:
        ctx.fail(
            f"op '{ctx.spec.op}' takes two or more inputs, got {len(xs)}",
            field="from",
            hint="name its inputs with `from: [a, b]`",
        )


class Elementwise(BlockSpec):
    """The shape rule of an elementwise op of several inputs (not an op itself)."""

    arity: ClassVar[int | None] = None

    def infer(self, ctx: InferContext, *xs: TensorType) -> TensorType:
        _at_least_two(ctx, xs)
        full = [x for x in xs if x.layout != "vector"] or list(xs)
        first = full[0]
        for k, x in enumerate(xs):
            same = x == first or (x.layout == "vector" and x.channels == first.channels)
            if not same:
                j = xs.index(first)
                ctx.fail(
                    f"op '{self.op}' needs inputs of one type, but input {j} is {first} and input {k} is {x}",
                    field="from",
                    hint="inputs must agree in layout, channels and size (a vector [B, C] may be broadcast over a "
                    "map or tokens of C channels)",
                )
        return first

    def layouts(self, xs: tuple[TensorType, ...]) -> list[str]:
        """The layout of each input."""
        return [x.layout for x in xs]

    def params(self, *xs: TensorType) -> int:
        return 0


@register
class AddSpec(Elementwise):
    """The sum of two or more inputs of one type (a residual connection); a vector ``[B, C]`` among maps or tokens
    of C channels is added at every position. The output has the type of the inputs that are not vectors."""

    op: Literal["add"]

    def joins_residual(self, inputs: int) -> bool:
        return inputs == 2

    def build(self, ctx: BuildContext, *xs: TensorType) -> Any:
        from blockgraph.layers.primitives import Add

        return Add(self.layouts(xs))


@register
class SubSpec(Elementwise):
    """The first input minus the second, of one type (PoolFormer's token mixer: ``pool(x) - x``); a vector
    ``[B, C]`` is broadcast as in ``add``."""

    op: Literal["sub"]
    arity = 2

    def build(self, ctx: BuildContext, *xs: TensorType) -> Any:
        from blockgraph.layers.primitives import Sub

        return Sub(self.layouts(xs))


@register
class MulSpec(Elementwise):
    """The elementwise product of two or more inputs of one type; a vector ``[B, C]`` among maps or tokens of C
    channels scales every position (a gate, as squeeze-and-excitation's). The output has the type of the inputs
    that are not vectors."""

    op: Literal["mul"]

    def build(self, ctx: BuildContext, *xs: TensorType) -> Any:
        from blockgraph.layers.primitives import Mul

        return Mul(self.layouts(xs))


@register
class ConcatSpec(BlockSpec):
    """Concatenate two or more inputs along channels, in ``from`` order (``torch.cat``): maps of one size, tokens of
    one grid and count of extra tokens, or vectors."""

    op: Literal["concat"]
    arity = None

    def infer(self, ctx: InferContext, *xs: TensorType) -> TensorType:
        _at_least_two(ctx, xs)
        first = xs[0]
        for k, x in enumerate(xs):
            ctx.expect(x, layout=CHANNELS, what=f"input {k}")
            if (x.layout, x.grid, x.extra) != (first.layout, first.grid, first.extra):
                ctx.fail(
                    f"cannot concatenate input 0 ({first}) and input {k} ({x}) along channels",
                    field="from",
                    hint="inputs must agree in layout and size (and extra tokens); only their channels may differ",
                )
        return first.with_(channels=sum(x.channels for x in xs))

    def build(self, ctx: BuildContext, *xs: TensorType) -> Any:
        from blockgraph.layers.primitives import Concat

        return Concat(dim=1 if xs[0].layout == "image" else -1)

    def params(self, *xs: TensorType) -> int:
        return 0


@register
class SplitSpec(BlockSpec):
    """Split the channels into consecutive groups of ``sizes`` (``torch.split``): one output port per group,
    ``s0``, ``s1``, ... or the ``names`` given (read them as ``from: node.s1``)."""

    op: Literal["split"]
    sizes: list[PositiveInt] = Field(min_length=2)
    """The channels of each part, in order; they must add up to the input's channels."""
    names: list[Name] | None = None
    """The output ports' names, one per part (default: ``s0``, ``s1``, ...)."""

    @field_validator("names")
    @classmethod
    def _one_name_per_part(cls, names: list[str] | None, info: ValidationInfo) -> list[str] | None:
        sizes = info.data.get("sizes")
        if names is not None and sizes is not None and len(names) != len(sizes):
            raise ValueError(f"{len(names)} names for {len(sizes)} parts: give one name per entry of `sizes`")
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"the names must differ: {names}")
        return names

    def output_ports(self) -> tuple[str, ...]:
        return tuple(self.names or (f"s{k}" for k in range(len(self.sizes))))

    def infer(self, ctx: InferContext, x: TensorType) -> dict[str, TensorType]:
        ctx.expect(x, layout=CHANNELS)
        if sum(self.sizes) != x.channels:
            ctx.fail(
                f"the parts add up to {sum(self.sizes)} channels, the input has {x.channels}",
                field="sizes",
                hint=f"make `sizes` add up to {x.channels}",
            )
        return {port: x.with_(channels=c) for port, c in zip(self.output_ports(), self.sizes, strict=True)}

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.primitives import Split

        return Split(self.sizes, dim=1 if x.layout == "image" else -1)

    def params(self, x: TensorType) -> int:
        return 0
