"""CoaT's conv-attentional primitives (Xu et al., "Co-Scale Conv-Attentional Image Transformers", ICCV 2021).

``conv_pos_enc`` (CPE) and ``conv_rel_pos_enc`` (CRPE) are meant to be declared once per stage under ``shared:``
and named by the blocks that use them; ``factor_attn_crpe`` is the factorized attention with CRPE, and
``serial_block`` is CoaT's pre-norm block: CPE → x + FA(LN(x)) → x + MLP(LN(x)). Tokens may carry extra (cls)
tokens in front; CPE and CRPE leave them unchanged / zero, as in the paper.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveFloat, PositiveInt

from blockgraph.blocks.base import BuildContext, drop_path, init_linear
from blockgraph.blocks.lazy import F, Module, nn, torch
from blockgraph.blocks.mlp import Activation, Mlp
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register, shared_ref
from blockgraph.types import TensorType

Rate = Annotated[float, Field(ge=0.0, lt=1.0)]
"""A dropout-like probability in [0, 1)."""
CpeRef = shared_ref("conv_pos_enc")
CrpeRef = shared_ref("conv_rel_pos_enc")


# ------------------------------------------------------------------------------------------------------------ CPE


@register
class ConvPosEncSpec(BlockSpec):
    """Convolutional position encoding: ``x + DWConv(x)`` on the image tokens; extra tokens pass unchanged."""

    op: Literal["conv_pos_enc"]
    dim: PositiveInt
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


class ConvPosEnc(Module):
    """``proj``: depthwise conv with bias; the residual is inside the module."""

    def __init__(self, dim, kernel=3, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel, 1, kernel // 2, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        extra = N - H * W
        feat = x[:, extra:].transpose(1, 2).view(B, C, H, W)  # [B, C, H, W]
        out = (self.proj(feat) + feat).flatten(2).transpose(1, 2)  # [B, H*W, C]
        return torch.cat((x[:, :extra], out), dim=1) if extra else out


# ----------------------------------------------------------------------------------------------------------- CRPE


@register
class ConvRelPosEncSpec(BlockSpec):
    """Convolutional relative position encoding: ``q * DWConv(v)`` with one kernel size per group of heads.

    ``windows`` maps kernel size → number of heads, in head order: ``{3: 2, 5: 3, 7: 3}`` gives heads 0-1 a 3x3
    kernel, heads 2-4 5x5 and heads 5-7 7x7. The output at extra (cls) token positions is zero.
    """

    op: Literal["conv_rel_pos_enc"]
    dim: PositiveInt
    """Channels (heads x head_dim)."""
    heads: PositiveInt
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
        if self.dim % self.heads:
            ctx.fail(f"dim {self.dim} is not divisible by heads {self.heads}", field="dim")

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        self.check(ctx)
        ctx.expect(x, layout="tokens", channels=self.dim)
        return x

    def build(self, ctx: BuildContext, x: TensorType | None = None) -> ConvRelPosEnc:
        return ConvRelPosEnc(self.dim // self.heads, self.heads, dict(self.windows), **ctx.dd)


def _splits_hint(heads: int, windows: list[int]) -> str:
    n = len(windows) or 1
    base, rest = divmod(heads, n)
    counts = [base + (1 if i < rest else 0) for i in range(n)]
    return "{" + ", ".join(f"{k}: {c}" for k, c in zip(windows, counts, strict=False)) + "}"


class ConvRelPosEnc(Module):
    """``conv_list``: one depthwise conv (with bias) per window, over its heads' channels."""

    def __init__(self, head_dim, heads, windows, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.conv_list = nn.ModuleList(
            nn.Conv2d(n * head_dim, n * head_dim, k, padding=k // 2, groups=n * head_dim, device=device, dtype=dtype)
            for k, n in windows.items()
        )
        self.channel_splits = [n * head_dim for n in windows.values()]

    def forward(self, q: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, h, N, Ch = q.shape
        H, W = size
        extra = N - H * W
        v_img = v[:, :, extra:].transpose(-1, -2).reshape(B, h * Ch, H, W)  # channel = head * Ch + c
        convs = [
            conv(part)
            for conv, part in zip(self.conv_list, torch.split(v_img, self.channel_splits, dim=1), strict=True)
        ]
        conv_v = torch.cat(convs, dim=1).reshape(B, h, Ch, H * W).transpose(-1, -2)  # [B, h, H*W, Ch]
        out = q[:, :, extra:] * conv_v
        return F.pad(out, (0, 0, extra, 0)) if extra else out  # [B, h, N, Ch], zero at extra tokens


# -------------------------------------------------------------------------------------------- factorized attention


@register
class FactorAttnCrpeSpec(BlockSpec):
    """Factorized attention ``Ch^-0.5 * q (softmax_N(k)^T v) + CRPE(q, v)`` with a shared CRPE."""

    op: Literal["factor_attn_crpe"]
    dim: PositiveInt
    heads: PositiveInt = 8
    qkv_bias: bool = True
    proj_drop: Rate = 0.0
    crpe: CrpeRef
    """The shared ``conv_rel_pos_enc`` module."""
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        check_heads(ctx, self.dim, self.heads)
        crpe = ctx.shared("crpe")
        if crpe.spec.heads != self.heads:
            ctx.fail(
                f"heads is {self.heads}, but the shared CRPE '{self.crpe}' splits {crpe.spec.heads} heads",
                field="heads",
            )
        return crpe.infer(x)

    def build(self, ctx: BuildContext, x: TensorType) -> FactorAttnConvRelPosEnc:
        return FactorAttnConvRelPosEnc(self.dim, self.heads, self.qkv_bias, self.proj_drop, **ctx.dd)


def check_heads(ctx: InferContext, dim: int, heads: int) -> None:
    if dim % heads:
        divisors = [d for d in range(1, min(dim, 64) + 1) if dim % d == 0]
        ctx.fail(
            f"dim {dim} is not divisible by heads {heads}",
            field="heads",
            hint=f"head counts that divide {dim}: {', '.join(map(str, divisors))}",
        )


class FactorAttnConvRelPosEnc(Module):
    """``qkv`` → factorized attention + ``crpe(q, v)`` → ``proj``."""

    def __init__(self, dim, heads=8, qkv_bias=True, proj_drop=0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = init_linear(nn.Linear(dim, dim * 3, bias=qkv_bias, **dd))
        self.proj = init_linear(nn.Linear(dim, dim, **dd))
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int], crpe: ConvRelPosEnc) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, h, N, Ch]
        factor = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)  # [B, h, N, Ch]
        x = self.scale * factor + crpe(q, v, size)
        x = x.transpose(1, 2).reshape(B, N, C)  # [B, N, h*Ch]
        return self.proj_drop(self.proj(x))


# --------------------------------------------------------------------------------------------------- serial block


@register
class SerialBlockSpec(BlockSpec):
    """CoaT's serial block: ``x = CPE(x); x = x + DropPath(FA(LN1(x))); x = x + DropPath(MLP(LN2(x)))``."""

    op: Literal["serial_block"]
    dim: PositiveInt
    heads: PositiveInt = 8
    mlp_ratio: PositiveFloat = 4.0
    qkv_bias: bool = True
    drop_path: Rate = 0.0
    proj_drop: Rate = 0.0
    norm_eps: PositiveFloat = 1e-6
    act: Activation = "gelu"
    cpe: CpeRef
    """The stage's shared ``conv_pos_enc``."""
    crpe: CrpeRef
    """The stage's shared ``conv_rel_pos_enc``."""
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        check_heads(ctx, self.dim, self.heads)
        x = ctx.shared("cpe").infer(x)
        crpe = ctx.shared("crpe")
        if crpe.spec.heads != self.heads:
            ctx.fail(
                f"heads is {self.heads}, but the shared CRPE '{self.crpe}' splits {crpe.spec.heads} heads",
                field="heads",
            )
        return crpe.infer(x)

    def build(self, ctx: BuildContext, x: TensorType) -> SerialBlock:
        return SerialBlock(
            self.dim, self.heads, self.mlp_ratio, self.qkv_bias, self.drop_path, self.proj_drop, self.norm_eps,
            self.act, **ctx.dd,
        )  # fmt: skip


class SerialBlock(Module):
    """``norm1``, ``factoratt_crpe``, ``norm2``, ``mlp`` (timm's names); CPE and CRPE are passed in."""

    def __init__(
        self, dim, heads, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, proj_drop=0.0, eps=1e-6, act="gelu",
        device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, eps=eps, **dd)
        self.factoratt_crpe = FactorAttnConvRelPosEnc(dim, heads, qkv_bias, proj_drop, **dd)
        self.drop_path = drop_path(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=eps, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=proj_drop, **dd)

    def forward(self, x: torch.Tensor, size: tuple[int, int], cpe: ConvPosEnc, crpe: ConvRelPosEnc) -> torch.Tensor:
        x = cpe(x, size)
        x = x + self.drop_path(self.factoratt_crpe(self.norm1(x), size, crpe))
        return x + self.drop_path(self.mlp(self.norm2(x)))
