"""CoaT's conv-attentional primitives (Xu et al., "Co-Scale Conv-Attentional Image Transformers", ICCV 2021).

``conv_pos_enc`` (CPE) and ``conv_rel_pos_enc`` (CRPE) are meant to be declared once per stage under ``shared:``
and named by the blocks that use them; ``factor_attn_crpe`` is the factorized attention with CRPE, and
``serial_block`` is CoaT's pre-norm block: CPE → x + FA(LN(x)) → x + MLP(LN(x)). Tokens may carry extra (cls)
tokens in front; CPE and CRPE leave them unchanged / zero, as in the paper.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import Activation, AttentionFields, BuildContext, Rate, TransformerFields
from blockgraph.graph.infer import InferContext, SharedCall
from blockgraph.spec.schema import BlockSpec, Name, register, shared_ref, shared_refs
from blockgraph.types import Constraint, TensorType

CpeRef = shared_ref("conv_pos_enc")
CrpeRef = shared_ref("conv_rel_pos_enc")
CpeRefs = shared_refs("conv_pos_enc")
CrpeRefs = shared_refs("conv_rel_pos_enc")


# ------------------------------------------------------------------------------------------------------------ CPE


@register
class ConvPosEncSpec(BlockSpec):
    """Convolutional position encoding: ``x + DWConv(x)`` on the image tokens; extra tokens pass unchanged."""

    op: Literal["conv_pos_enc"]
    dim: PositiveInt
    """Channels of the tokens."""
    kernel: PositiveInt = 3
    """Depthwise kernel size (odd, 'same' padding)."""
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        if self.kernel % 2 == 0:
            ctx.fail(f"kernel {self.kernel} must be odd (the map keeps its size)", field="kernel")
        ctx.expect(x, layout="tokens", channels=self.dim)
        return x

    def build(self, ctx: BuildContext, x: TensorType | None = None) -> Any:
        from blockgraph.layers.coat import ConvPosEnc

        return ConvPosEnc(**self.fields(), **ctx.dd)

    def params(self, x: TensorType | None = None) -> int:
        return count.conv(self.dim, self.dim, self.kernel, groups=self.dim)


# ----------------------------------------------------------------------------------------------------------- CRPE


@register
class ConvRelPosEncSpec(BlockSpec):
    """Convolutional relative position encoding: ``q * DWConv(v)`` with one kernel size per group of heads.

    ``windows`` maps kernel size → number of heads, in head order: ``{3: 2, 5: 3, 7: 3}`` gives heads 0-1 a 3x3
    kernel, heads 2-4 5x5 and heads 5-7 7x7. Its module gives the image tokens' term; users add it there (the
    extra tokens get none).
    """

    op: Literal["conv_rel_pos_enc"]
    dim: PositiveInt
    """Channels (heads x head_dim)."""
    heads: PositiveInt
    """Attention heads of the blocks that use it: `dim` splits into `heads` groups."""
    windows: dict[PositiveInt, PositiveInt]
    """Kernel size → heads using it; kernel sizes odd, head counts summing to ``heads``."""

    def check(self, ctx: InferContext) -> None:
        for k in self.windows:
            if k % 2 == 0:
                ctx.fail(f"window {k} must be odd (the map keeps its size)", field="windows", hint="use 3, 5 or 7")
        total = sum(self.windows.values())
        if total != self.heads:
            splits = " + ".join(str(v) for v in self.windows.values())
            ctx.fail(
                f"the window head splits sum to {total} ({splits}), but `heads` is {self.heads}",
                field="windows",
                hint=f"make the splits sum to {self.heads}, e.g. {_splits_hint(self.heads, list(self.windows))}",
            )
        ctx.divides(self.dim, self.heads, field="heads", what="head")

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        self.check(ctx)
        ctx.expect(x, layout="tokens", channels=self.dim)
        return x

    def build(self, ctx: BuildContext, x: TensorType | None = None) -> Any:
        from blockgraph.layers.coat import ConvRelPosEnc

        return ConvRelPosEnc(**self.fields(), **ctx.dd)

    def params(self, x: TensorType | None = None) -> int:
        head_dim = self.dim // self.heads
        return sum(count.conv(n * head_dim, n * head_dim, k, groups=n * head_dim) for k, n in self.windows.items())


def _splits_hint(heads: int, windows: list[int]) -> str:
    n = len(windows) or 1
    base, rest = divmod(heads, n)
    counts = [base + (1 if i < rest else 0) for i in range(n)]
    return "{" + ", ".join(f"{k}: {c}" for k, c in zip(windows, counts, strict=False)) + "}"


# -------------------------------------------------------------------------------------------- factorized attention


@register
class FactorAttnCrpeSpec(AttentionFields):
    """Factorized attention ``Ch^-0.5 * q (softmax_N(k)^T v) + CRPE(q, v)`` with a shared CRPE."""

    op: Literal["factor_attn_crpe"]
    heads: PositiveInt = 8
    crpe: CrpeRef
    """The shared ``conv_rel_pos_enc`` module."""
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        self.check_heads(ctx)
        return apply_crpe(ctx, ctx.shared("crpe"), self.heads, x)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.coat import FactorAttnConvRelPosEnc

        return FactorAttnConvRelPosEnc(**self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.attention(self.dim, self.qkv_bias)


def apply_crpe(ctx: InferContext, crpe: SharedCall, heads: int, x: TensorType) -> TensorType:
    """A user's shape rule applying its shared CRPE: the CRPE must split the user's number of heads."""
    if crpe.spec.heads != heads:
        ctx.fail(f"heads is {heads}, but the shared CRPE '{crpe.name}' splits {crpe.spec.heads} heads", field="heads")
    return crpe.infer(x)


# --------------------------------------------------------------------------------------------------- serial block


@register
class SerialBlockSpec(TransformerFields):
    """CoaT's serial block: ``x = CPE(x); x = x + DropPath(FA(LN1(x))); x = x + DropPath(MLP(LN2(x)))``."""

    op: Literal["serial_block"]
    heads: PositiveInt = 8
    cpe: CpeRef
    """The stage's shared ``conv_pos_enc``."""
    crpe: CrpeRef
    """The stage's shared ``conv_rel_pos_enc``."""
    needs_size = True
    trims_tokens = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        self.check_heads(ctx)
        return apply_crpe(ctx, ctx.shared("crpe"), self.heads, ctx.shared("cpe").infer(x))

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.coat import SerialBlock

        return SerialBlock(**self.fields(), keep=ctx.keep_tokens, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.transformer_block(self.dim, int(self.dim * self.mlp_ratio), self.qkv_bias)


# ------------------------------------------------------------------------------------------------- parallel block


@register
class CoatParallelBlockSpec(AttentionFields):
    """CoaT's parallel block over several scales (timm ``ParallelBlock``): per scale, CPE then factorized attention
    with that scale's shared CRPE; each scale adds every other scale's attention output resized to its grid
    (bilinear, ``align_corners=False``, each source's cls token carried along); then one MLP shared by all scales.

    ``resize: scale`` resizes by the ratio of strides, as timm does (``F.interpolate(scale_factor=...)``), which
    needs the grids to be exact multiples of each other: a constraint on the input size that ``validate`` states.
    ``resize: size`` resizes to the target grid (the official code), which takes any input size.
    """

    op: Literal["coat_parallel_block"]
    dim: PositiveInt
    """Channels of every scale (the scales share one MLP and add into each other)."""
    heads: PositiveInt = 8
    mlp_ratios: PositiveFloat | list[PositiveFloat] = 4.0
    """One ratio, or one per scale; the shared MLP needs them to give one hidden size."""
    drop_path: Rate = 0.0
    """Stochastic-depth rate of the residual branches (0: off)."""
    norm_eps: PositiveFloat = 1e-6
    """LayerNorm epsilon."""
    act: Activation = "gelu"
    """Activation function."""
    cpes: CpeRefs
    """The shared ``conv_pos_enc`` of each scale, in input order."""
    crpes: CrpeRefs
    """The shared ``conv_rel_pos_enc`` of each scale, in input order."""
    ports: list[Name] = ["x2", "x3", "x4"]
    """Names of the scales: the outputs (``from: parallel.x3``) and the module names (``norm1.x3``)."""
    resize: Literal["scale", "size"] = "scale"
    """`scale`: timm's scale-factor resizing (the grids must be exact multiples of each other); `size`: resize to
    the target grid (any input size), as the official code."""
    arity = None
    needs_size = True

    def output_ports(self) -> tuple[str, ...]:
        return tuple(self.ports)

    def infer(self, ctx: InferContext, *xs: TensorType) -> dict[str, TensorType]:
        n = len(self.ports)
        if len(xs) != n:
            ctx.fail(f"{len(xs)} inputs for {n} scales ({', '.join(self.ports)})", field="from")
        for field_name, op in (("cpes", "conv_pos_enc"), ("crpes", "conv_rel_pos_enc")):
            count = len(getattr(self, field_name))
            if count != n:
                ctx.fail(
                    f"`{field_name}` names {count} module{'s' if count != 1 else ''} for {n} scales",
                    field=field_name,
                    hint=f"name one shared {op} per scale, in the order of `ports` ({', '.join(self.ports)})",
                )
        ratios = self.mlp_ratios if isinstance(self.mlp_ratios, list) else [self.mlp_ratios] * n
        if len(ratios) != n:
            ctx.fail(f"`mlp_ratios` has {len(ratios)} values for {n} scales", field="mlp_ratios")
        hidden = [int(self.dim * r) for r in ratios]
        if len(set(hidden)) > 1:
            ctx.fail(
                f"the scales share one MLP, but mlp_ratios give hidden sizes {', '.join(map(str, hidden))}",
                field="mlp_ratios",
                hint="give every scale the same ratio (one MLP module serves all scales)",
            )
        self.check_heads(ctx)
        for k, x in enumerate(xs):
            ctx.expect(x, layout="tokens", what=f"scale {self.ports[k]} (input {k})")
        if len({x.channels for x in xs}) > 1:
            widths = ", ".join(f"{p} {x.channels}" for p, x in zip(self.ports, xs, strict=True))
            ctx.fail(
                f"the scales have different widths ({widths} channels)",
                field="from",
                hint="a parallel block's scales add into each other and share one MLP: give them one width",
            )
        for k, x in enumerate(xs):
            ctx.expect(x, channels=self.dim, what=f"scale {self.ports[k]} (input {k})")
        if len({x.extra for x in xs}) > 1:
            ctx.fail("the scales carry different numbers of extra (cls) tokens", field="from")
        outs = {}
        for port, x, cpe, crpe in zip(self.ports, xs, ctx.shared_list("cpes"), ctx.shared_list("crpes"), strict=True):
            outs[port] = apply_crpe(ctx, crpe, self.heads, cpe.infer(x))
        if self.resize == "scale":
            self._scale_factors(ctx, list(outs.values()))
        return outs

    def _scale_factors(self, ctx: InferContext, xs: list[TensorType]) -> list[list[float | None]]:
        """The resize factor from scale j to scale i (``stride_j / stride_i``), requiring that it lands exactly."""
        strides = [x.stride() for x in xs]
        if any(s is None for s in strides):
            ctx.fail(
                "`resize: scale` needs every scale's stride, but some grid is not the input size over an integer",
                field="resize",
                hint="use `resize: size`",
            )
        factors: list[list[float | None]] = [[None] * len(xs) for _ in xs]
        for i, target in enumerate(xs):
            for j, source in enumerate(xs):
                if i == j:
                    continue
                num, den = strides[j], strides[i]  # stride_j / stride_i
                for axis in (0, 1):
                    landed = (source.grid[axis] * num) // den
                    ctx.require(
                        Constraint.eq(landed - target.grid[axis], 0),
                        f"resizing scale {self.ports[j]} ({source.grid[axis]}) by {num}/{den} must give scale "
                        f"{self.ports[i]}'s {'height' if axis == 0 else 'width'} ({target.grid[axis]})",
                        field="resize",
                        hint="timm resizes by scale factors; `resize: size` takes any input size",
                    )
                factors[i][j] = num / den
        return factors

    @property
    def mlp_ratio(self) -> float:
        """The shared MLP's ratio (the first of ``mlp_ratios``; the shape rule checks they agree)."""
        return self.mlp_ratios[0] if isinstance(self.mlp_ratios, list) else self.mlp_ratios

    def build(self, ctx: BuildContext, *xs: TensorType) -> Any:
        from blockgraph.layers.coat import ParallelBlock

        n = len(self.ports)
        factors = None
        if self.resize == "scale":
            strides = [x.stride() for x in xs]
            factors = [[strides[j] / strides[i] if i != j else None for j in range(n)] for i in range(n)]
        return ParallelBlock(
            **self.fields("mlp_ratios", "resize"), mlp_ratio=self.mlp_ratio, factors=factors, extra=xs[0].extra,
            **ctx.dd,
        )  # fmt: skip

    def params(self, *xs: TensorType) -> int:
        per_scale = 2 * count.norm(self.dim) + count.attention(self.dim, self.qkv_bias)
        return len(self.ports) * per_scale + count.mlp(self.dim, int(self.dim * self.mlp_ratio))


# ------------------------------------------------------------------------------------------------- aggregate head


@register
class AggregateHeadSpec(BlockSpec):
    """CoaT's head: norm each scale, stack their cls tokens (or token means), mix them with a 1x1 Conv1d
    (scales → 1), then a linear classifier."""

    op: Literal["aggregate_head"]
    dim: PositiveInt
    """Channels of every scale's tokens."""
    num_classes: NonNegativeInt
    """Classes; 0 gives the pooled features (no classifier)."""
    pool: Literal["token", "avg"] = "token"
    """`token`: each scale's cls token; `avg`: the mean of each scale's image tokens."""
    norm_eps: PositiveFloat = 1e-6
    """LayerNorm epsilon."""
    drop: Rate = 0.0
    """Dropout before the classifier (training only)."""
    arity = None

    classifiers = ("fc",)

    def infer(self, ctx: InferContext, *xs: TensorType) -> TensorType:
        for k, x in enumerate(xs):
            ctx.expect(x, layout="tokens", channels=self.dim, what=f"input {k}")
            if self.pool == "token" and x.extra == 0:
                ctx.fail(f"`pool: token` needs a cls token, but input {k} carries none", field="pool")
        return TensorType.vector(self.num_classes or self.dim)

    def build(self, ctx: BuildContext, *xs: TensorType) -> Any:
        from blockgraph.layers.coat import AggregateHead

        return AggregateHead(n=len(xs), extra=xs[0].extra, **self.fields(), **ctx.dd)

    def params(self, *xs: TensorType) -> int:
        n = len(xs)
        head = count.linear(self.dim, self.num_classes) if self.num_classes else 0
        return n * count.norm(self.dim) + count.conv(n, 1, (1,)) + head
