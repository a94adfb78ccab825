"""CoaT's conv-attentional primitives (Xu et al., "Co-Scale Conv-Attentional Image Transformers", ICCV 2021).

``conv_pos_enc`` (CPE) and ``conv_rel_pos_enc`` (CRPE) are meant to be declared once per stage under ``shared:``
and named by the blocks that use them; ``factor_attn_crpe`` is the factorized attention with CRPE, and
``serial_block`` is CoaT's pre-norm block: CPE → x + FA(LN(x)) → x + MLP(LN(x)). Tokens may carry extra (cls)
tokens in front; CPE and CRPE leave them unchanged / zero, as in the paper.
"""

from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate, drop_path, leading, linear, split_qkv
from blockgraph.blocks.lazy import F, Module, fused, nn, torch
from blockgraph.blocks.mlp import Activation, Mlp
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

    def build(self, ctx: BuildContext, x: TensorType | None = None) -> ConvPosEnc:
        return ConvPosEnc(self.dim, self.kernel, **ctx.dd)

    def params(self, x: TensorType | None = None) -> int:
        return count.conv(self.dim, self.dim, self.kernel, groups=self.dim)


class ConvPosEnc(Module):
    """``proj``: depthwise conv with bias (run by ``fused.depthwise_conv2d``); the residual is inside the module."""

    def __init__(self, dim, kernel=3, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel, 1, kernel // 2, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        extra = N - H * W
        feat = x[:, extra:].transpose(1, 2).view(B, C, H, W)  # [B, C, H, W], channels-last strides
        y = fused.depthwise_conv2d(feat, self.proj.weight, self.proj.bias, self.proj.padding)
        if fused.enabled(self):
            if not extra:  # the conv's output is fresh: add in place
                return y.add_(feat).flatten(2).transpose(1, 2)
            out = torch.empty_like(x, memory_format=torch.contiguous_format)  # conv + residual written in place of cat
            out[:, :extra] = x[:, :extra]
            torch.add(y, feat, out=out[:, extra:].transpose(1, 2).view(B, C, H, W))
            return out
        out = (y + feat).flatten(2).transpose(1, 2)  # [B, H*W, C]
        return torch.cat((x[:, :extra], out), dim=1) if extra else out


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

    def build(self, ctx: BuildContext, x: TensorType | None = None) -> ConvRelPosEnc:
        return ConvRelPosEnc(self.dim // self.heads, self.heads, dict(self.windows), **ctx.dd)

    def params(self, x: TensorType | None = None) -> int:
        head_dim = self.dim // self.heads
        return sum(count.conv(n * head_dim, n * head_dim, k, groups=n * head_dim) for k, n in self.windows.items())


def _splits_hint(heads: int, windows: list[int]) -> str:
    n = len(windows) or 1
    base, rest = divmod(heads, n)
    counts = [base + (1 if i < rest else 0) for i in range(n)]
    return "{" + ", ".join(f"{k}: {c}" for k, c in zip(windows, counts, strict=False)) + "}"


class ConvRelPosEnc(Module):
    """``conv_list``: one depthwise conv (with bias) per window, over its heads' channels; they run as one conv whose
    kernels are zero-padded to the largest (``fused.merge_depthwise``), so the window sizes must be odd."""

    def __init__(self, head_dim, heads, windows, device=None, dtype=None):
        super().__init__()
        if any(k % 2 == 0 for k in windows):
            raise ValueError(f"CRPE windows must be odd (the map keeps its size), got {sorted(windows)}")
        self.heads = heads
        self.conv_list = nn.ModuleList(
            nn.Conv2d(n * head_dim, n * head_dim, k, padding=k // 2, groups=n * head_dim, device=device, dtype=dtype)
            for k, n in windows.items()
        )

    def forward(self, q: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``q * DWConv(v)`` at the image tokens: ``[B, h, H*W, Ch]``. timm's CRPE returns ``[B, h, N, Ch]`` with a
        zero row per extra token; its users add this output at the image tokens only, which is the same sum
        without the zero rows."""
        B, h, N, Ch = q.shape
        H, W = size
        extra = N - H * W
        v_img = v[:, :, extra:].transpose(-1, -2).reshape(B, h * Ch, H, W)  # channel = head * Ch + c
        weight, bias = fused.merge_depthwise(self.conv_list)  # one conv (differentiable), not split + convs + cat
        conv_v = fused.depthwise_conv2d(v_img, weight, bias, weight.shape[-1] // 2)
        conv_v = conv_v.reshape(B, h, Ch, H * W).transpose(-1, -2)  # [B, h, H*W, Ch]
        return q[:, :, extra:] * conv_v

    def accumulate(self, out: torch.Tensor, q: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> None:
        """``out += q * DWConv(v)`` with the three in the token layout ``[B, H*W, h, Ch]`` (image tokens only), for
        eager inference: the windows' kernels run as one depthwise conv (``fused.merged_depthwise``), channels-last
        on a view of ``v``, and the product is added in place."""
        B, L, h, Ch = v.shape
        weight, bias = fused.merged_depthwise(self.conv_list)
        img = v.reshape(B, size[0], size[1], h * Ch).permute(0, 3, 1, 2)  # [B, C, H, W], channels-last strides
        conv = fused.depthwise_conv2d(img, weight, bias, weight.shape[-1] // 2)
        out.addcmul_(q, conv.permute(0, 2, 3, 1).reshape(B, L, h, Ch))


# -------------------------------------------------------------------------------------------- factorized attention


@register
class FactorAttnCrpeSpec(BlockSpec):
    """Factorized attention ``Ch^-0.5 * q (softmax_N(k)^T v) + CRPE(q, v)`` with a shared CRPE."""

    op: Literal["factor_attn_crpe"]
    dim: PositiveInt
    """Channels of the input (and of the output)."""
    heads: PositiveInt = 8
    """Attention heads; they must divide `dim`."""
    qkv_bias: bool = True
    """Bias on the q, k, v projection."""
    proj_drop: Rate = 0.0
    """Dropout after the output projection and in the MLP (training only)."""
    crpe: CrpeRef
    """The shared ``conv_rel_pos_enc`` module."""
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        check_heads(ctx, self.dim, self.heads)
        return apply_crpe(ctx, ctx.shared("crpe"), self.heads, x)

    def build(self, ctx: BuildContext, x: TensorType) -> FactorAttnConvRelPosEnc:
        return FactorAttnConvRelPosEnc(self.dim, self.heads, self.qkv_bias, self.proj_drop, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.attention(self.dim, self.qkv_bias)


def apply_crpe(ctx: InferContext, crpe: SharedCall, heads: int, x: TensorType) -> TensorType:
    """A user's shape rule applying its shared CRPE: the CRPE must split the user's number of heads."""
    if crpe.spec.heads != heads:
        ctx.fail(f"heads is {heads}, but the shared CRPE '{crpe.name}' splits {crpe.spec.heads} heads", field="heads")
    return crpe.infer(x)


def check_heads(ctx: InferContext, dim: int, heads: int) -> None:
    ctx.divides(dim, heads, field="heads", what="head")


class FactorAttnConvRelPosEnc(Module):
    """``qkv`` → factorized attention + ``crpe(q, v)`` → ``proj``."""

    def __init__(self, dim, heads=8, qkv_bias=True, proj_drop=0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        size: tuple[int, int],
        crpe: ConvRelPosEnc,
        residual: torch.Tensor | None = None,
        queries: int | None = None,
    ) -> torch.Tensor:
        """Attention over ``x``, plus ``residual`` if given (eval mode only; see ``Mlp.forward``). ``queries``: only
        the first ``queries`` tokens, all of them extra (cls) tokens, attend and are returned."""
        B, N, C = x.shape
        extra = N - size[0] * size[1]  # the CRPE adds nothing at extra (cls) tokens
        fast = fused.enabled(self)
        if queries is not None:  # extra tokens only: no CRPE term
            q, k, v = split_qkv(self.qkv, x, self.heads, queries, fast)
            x = (q @ (k.softmax(dim=2).transpose(-1, -2) @ v)).mul_(self.scale)  # [B, h, queries, Ch]
            return self._out(x.transpose(1, 2).reshape(B, queries, C), residual, fast)
        if fast:
            # The same sums in the token layout [B, N, h, Ch]: scale * factor is written once where proj reads it,
            # and the CRPE term is added in place.
            qkv = fused.linear(x, self.qkv).view(B, N, 3, self.heads, C // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, Ch] views
            factor = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)  # [B, h, N, Ch]
            out = torch.mul(factor.transpose(1, 2), self.scale, out=x.new_empty(B, N, self.heads, C // self.heads))
            crpe.accumulate(out[:, extra:], qkv[:, extra:, 0], qkv[:, extra:, 2], size)
            return self._out(out.view(B, N, C), residual, fast)
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, h, N, Ch]
        factor = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)  # [B, h, N, Ch]
        x = self.scale * factor
        if not extra:  # out of place: torch.compile fuses it (a sliced in-place add becomes a scatter copy)
            x = x + crpe(q, v, size)
        elif torch.compiler.is_compiling():
            x = torch.cat((x[:, :, :extra], x[:, :, extra:] + crpe(q, v, size)), dim=2)
        else:
            x[:, :, extra:] += crpe(q, v, size)
        return self._out(x.transpose(1, 2).reshape(B, N, C), residual, fast)  # [B, N, h*Ch]

    def _out(self, x: torch.Tensor, residual: torch.Tensor | None, fast: bool) -> torch.Tensor:
        """``proj`` (then dropout) of ``x`` ``[B, N, C]``, plus ``residual`` if given: fused when ``fast``."""
        if fast:
            return fused.linear(x, self.proj, residual=residual)
        x = self.proj_drop(self.proj(x))
        return x if residual is None else residual + x


# --------------------------------------------------------------------------------------------------- serial block


@register
class SerialBlockSpec(BlockSpec):
    """CoaT's serial block: ``x = CPE(x); x = x + DropPath(FA(LN1(x))); x = x + DropPath(MLP(LN2(x)))``."""

    op: Literal["serial_block"]
    dim: PositiveInt
    """Channels of the input (and of the output)."""
    heads: PositiveInt = 8
    """Attention heads; they must divide `dim`."""
    mlp_ratio: PositiveFloat = 4.0
    """MLP hidden width = int(dim * mlp_ratio)."""
    qkv_bias: bool = True
    """Bias on the q, k, v projection."""
    drop_path: Rate = 0.0
    """Stochastic-depth rate of the residual branches (0: off)."""
    proj_drop: Rate = 0.0
    """Dropout after the output projection and in the MLP (training only)."""
    norm_eps: PositiveFloat = 1e-6
    """LayerNorm epsilon."""
    act: Activation = "gelu"
    """Activation function."""
    cpe: CpeRef
    """The stage's shared ``conv_pos_enc``."""
    crpe: CrpeRef
    """The stage's shared ``conv_rel_pos_enc``."""
    needs_size = True
    trims_tokens = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        check_heads(ctx, self.dim, self.heads)
        return apply_crpe(ctx, ctx.shared("crpe"), self.heads, ctx.shared("cpe").infer(x))

    def build(self, ctx: BuildContext, x: TensorType) -> SerialBlock:
        return SerialBlock(
            self.dim, self.heads, self.mlp_ratio, self.qkv_bias, self.drop_path, self.proj_drop, self.norm_eps,
            self.act, keep=ctx.keep_tokens, **ctx.dd,
        )  # fmt: skip

    def params(self, x: TensorType) -> int:
        return count.transformer_block(self.dim, int(self.dim * self.mlp_ratio), self.qkv_bias)


class SerialBlock(Module):
    """``norm1``, ``factoratt_crpe``, ``norm2``, ``mlp`` (timm's names); CPE and CRPE are passed in. With ``keep``,
    only the first ``keep`` tokens (extra tokens) are computed and returned; every token is a key and a value."""

    def __init__(
        self, dim, heads, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, proj_drop=0.0, eps=1e-6, act="gelu",
        keep=None, device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.keep = keep
        self.norm1 = nn.LayerNorm(dim, eps=eps, **dd)
        self.factoratt_crpe = FactorAttnConvRelPosEnc(dim, heads, qkv_bias, proj_drop, **dd)
        self.drop_path = drop_path(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=eps, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=proj_drop, **dd)

    def forward(self, x: torch.Tensor, size: tuple[int, int], cpe: ConvPosEnc, crpe: ConvRelPosEnc) -> torch.Tensor:
        x = cpe(x, size)
        keep = self.keep  # None, or compute the first `keep` tokens only (queries); every token is a key and value
        if fused.enabled(self):  # the residual adds happen in the projections' epilogues
            x = self.factoratt_crpe(self.norm1(x), size, crpe, residual=leading(x, keep), queries=keep)
            return self.mlp(self.norm2(x), residual=x)
        x = leading(x, keep) + self.drop_path(self.factoratt_crpe(self.norm1(x), size, crpe, queries=keep))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ------------------------------------------------------------------------------------------------- parallel block


@register
class CoatParallelBlockSpec(BlockSpec):
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
    """Attention heads; they must divide `dim`."""
    mlp_ratios: PositiveFloat | list[PositiveFloat] = 4.0
    """One ratio, or one per scale; the shared MLP needs them to give one hidden size."""
    qkv_bias: bool = True
    """Bias on the q, k, v projection."""
    drop_path: Rate = 0.0
    """Stochastic-depth rate of the residual branches (0: off)."""
    proj_drop: Rate = 0.0
    """Dropout after the output projection and in the MLP (training only)."""
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
        check_heads(ctx, self.dim, self.heads)
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

    def build(self, ctx: BuildContext, *xs: TensorType) -> ParallelBlock:
        n = len(self.ports)
        ratio = self.mlp_ratios[0] if isinstance(self.mlp_ratios, list) else self.mlp_ratios
        factors = None
        if self.resize == "scale":
            strides = [x.stride() for x in xs]
            factors = [[strides[j] / strides[i] if i != j else None for j in range(n)] for i in range(n)]
        return ParallelBlock(
            self.dim, self.ports, self.heads, int(self.dim * ratio), self.qkv_bias, self.drop_path, self.proj_drop,
            self.norm_eps, self.act, factors, xs[0].extra, **ctx.dd,
        )  # fmt: skip

    def params(self, *xs: TensorType) -> int:
        ratio = self.mlp_ratios[0] if isinstance(self.mlp_ratios, list) else self.mlp_ratios
        per_scale = 2 * count.norm(self.dim) + count.attention(self.dim, self.qkv_bias)
        return len(self.ports) * per_scale + count.mlp(self.dim, int(self.dim * ratio))


class ParallelBlock(Module):
    """Per scale ``norm1[p]``, ``attn[p]`` (FactorAttnConvRelPosEnc), ``norm2[p]``; one ``mlp`` for all scales."""

    def __init__(
        self, dim, ports, heads, hidden, qkv_bias=True, drop_path_rate=0.0, proj_drop=0.0, eps=1e-6, act="gelu",
        factors=None, extra=1, device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.ports = list(ports)
        self.extra = extra
        self.factors = factors
        n = len(ports)
        # Sources added to each scale: nearest first, coarser first among equals (timm's order of additions).
        self.sources = [sorted((j for j in range(n) if j != i), key=lambda j, i=i: (abs(j - i), -j)) for i in range(n)]
        self.norm1 = nn.ModuleDict({p: nn.LayerNorm(dim, eps=eps, **dd) for p in ports})
        self.attn = nn.ModuleDict({p: FactorAttnConvRelPosEnc(dim, heads, qkv_bias, proj_drop, **dd) for p in ports})
        self.drop_path = drop_path(drop_path_rate)
        self.norm2 = nn.ModuleDict({p: nn.LayerNorm(dim, eps=eps, **dd) for p in ports})
        self.mlp = Mlp(dim, hidden, act=act, drop=proj_drop, **dd)

    def _resize(self, x: torch.Tensor, size: tuple[int, int], target: tuple[int, int], factor: float | None):
        B, N, C = x.shape
        img = x[:, self.extra :].transpose(1, 2).reshape(B, C, size[0], size[1])  # [B, C, H, W]
        if factor is not None:
            img = F.interpolate(img, scale_factor=factor, recompute_scale_factor=False, mode="bilinear",
                                align_corners=False)  # fmt: skip
        else:
            img = F.interpolate(img, size=target, mode="bilinear", align_corners=False)
        img = img.reshape(B, C, -1).transpose(1, 2)  # [B, h*w, C]
        return torch.cat((x[:, : self.extra], img), dim=1) if self.extra else img

    def forward(self, *args, cpes, crpes):
        n = len(self.ports)
        xs, sizes = list(args[:n]), args[n:]
        xs = [cpe(x, size) for cpe, x, size in zip(cpes, xs, sizes, strict=True)]
        cur = [
            self.attn[p](self.norm1[p](x), size, crpe)
            for p, x, size, crpe in zip(self.ports, xs, sizes, crpes, strict=True)
        ]
        mixed = []
        for i in range(n):
            total = cur[i]
            for j in self.sources[i]:
                factor = self.factors[i][j] if self.factors is not None else None
                total = total + self._resize(cur[j], sizes[j], sizes[i], factor)
            mixed.append(total)
        outs = []
        fast = fused.enabled(self)
        for p, x, m in zip(self.ports, xs, mixed, strict=True):
            x = x + self.drop_path(m)
            if fast:  # the residual add happens in fc2's epilogue
                outs.append(self.mlp(self.norm2[p](x), residual=x))
            else:
                outs.append(x + self.drop_path(self.mlp(self.norm2[p](x))))
        return tuple(outs)


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

    def infer(self, ctx: InferContext, *xs: TensorType) -> TensorType:
        for k, x in enumerate(xs):
            ctx.expect(x, layout="tokens", channels=self.dim, what=f"input {k}")
            if self.pool == "token" and x.extra == 0:
                ctx.fail(f"`pool: token` needs a cls token, but input {k} carries none", field="pool")
        return TensorType.vector(self.num_classes or self.dim)

    def build(self, ctx: BuildContext, *xs: TensorType) -> AggregateHead:
        return AggregateHead(
            self.dim, len(xs), self.num_classes, self.pool, xs[0].extra, self.norm_eps, self.drop, **ctx.dd
        )

    def params(self, *xs: TensorType) -> int:
        n = len(xs)
        head = count.linear(self.dim, self.num_classes) if self.num_classes else 0
        return n * count.norm(self.dim) + count.conv(n, 1, (1,)) + head


class AggregateHead(Module):
    """``norms[k]`` per scale → pool → ``aggregate`` (Conv1d(n, 1, 1)) → drop → ``fc``."""

    def __init__(self, dim, n, num_classes, pool="token", extra=1, eps=1e-6, drop=0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.pool = pool
        self.extra = extra
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps, **dd) for _ in range(n))
        self.aggregate = nn.Conv1d(n, 1, kernel_size=1, **dd)
        self.drop = nn.Dropout(drop)
        self.fc = linear(dim, num_classes, **dd) if num_classes else nn.Identity()

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.pool == "token":
            pooled = [norm(x)[:, 0] for norm, x in zip(self.norms, xs, strict=True)]
        else:
            pooled = [norm(x)[:, self.extra :].mean(dim=1) for norm, x in zip(self.norms, xs, strict=True)]
        x = self.aggregate(torch.stack(pooled, dim=1)).squeeze(1)  # [B, n, C] -> [B, C]
        return self.fc(self.drop(x))
