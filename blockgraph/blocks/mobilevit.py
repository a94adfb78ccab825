"""MobileViT primitives (Mehta & Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision
Transformer", ICLR 2022), in timm's ByobNet layout: the MV2 inverted residual and the MobileViT block (local conv,
unfold into 2x2-patch sequences, transformer, fold, fuse with the input by concatenation)."""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate, drop_path, init_elsewhere
from blockgraph.blocks.conv import ConvAct, ConvBn, conv2d
from blockgraph.blocks.lazy import Module, fused, nn, torch
from blockgraph.blocks.vit import VitBlock
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import Constraint, TensorType


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's ``make_divisible``: round to the nearest multiple of ``divisor``, never below 90% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


@register
class Mv2BlockSpec(BlockSpec):
    """MobileNetV2's inverted residual (MV2): 1x1 expand (BN, act) → 3x3 depthwise with the stride (BN, act) → 1x1
    project (BN, no act); the input is added back only when the shapes allow (``stride 1`` and ``dim == dim_out``).
    The hidden width is ``make_divisible(input channels * expansion, 8)``."""

    op: Literal["mv2_block"]
    dim_out: PositiveInt
    """Output channels."""
    stride: Literal[1, 2] = 1
    """1 or 2 (the depthwise conv's); the residual is used only at stride 1 with equal widths."""
    expansion: PositiveFloat = 4.0
    """Hidden width = make_divisible(input channels x expansion, 8)."""
    act: ConvAct = "silu"
    """Activation function."""
    drop_path: Rate = 0.0
    """Stochastic-depth rate of the residual branches (0: off)."""

    batch_norm = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image")
        return TensorType.image(self.dim_out, *ctx.conv2d(x, 3, self.stride, field="stride"))

    def build(self, ctx: BuildContext, x: TensorType) -> Mv2Block:
        hidden = make_divisible(x.channels * self.expansion)
        return Mv2Block(x.channels, self.dim_out, hidden, self.stride, self.act, self.drop_path, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.inverted_residual(x.channels, make_divisible(x.channels * self.expansion), self.dim_out)


class Mv2Block(Module):
    """``conv1_1x1``, ``conv2_kxk`` (depthwise), ``conv3_1x1`` (timm's BottleneckBlock names)."""

    def __init__(self, dim, dim_out, hidden, stride=1, act="silu", drop_path_rate=0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1_1x1 = ConvBn(dim, hidden, 1, act=act, init="fan_out_groups", **dd)
        self.conv2_kxk = ConvBn(hidden, hidden, 3, stride, 1, groups=hidden, act=act, init="fan_out_groups", **dd)
        self.conv3_1x1 = ConvBn(hidden, dim_out, 1, init="fan_out_groups", **dd)
        self.residual = stride == 1 and dim == dim_out
        if self.residual and self.conv3_1x1.bn.weight.device.type != "meta":
            nn.init.zeros_(self.conv3_1x1.bn.weight)  # timm's zero_init_last
        self.drop_path = drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        if self.residual and fused.enabled(self):
            return y.add_(x)
        return x + self.drop_path(y) if self.residual else y


@register
class MobileVitBlockSpec(BlockSpec):
    """MobileViT block: 3x3 conv (BN, act) → 1x1 to ``transformer_dim`` → unfold into ``patch x patch`` positions,
    each a sequence over the patches → ``layers`` pre-norm transformer layers → LayerNorm → fold → 1x1 back (BN,
    act) → concatenate with the block's input → 3x3 fusion (BN, act). No residual around the block.

    The map must divide into patches (checked statically)."""

    op: Literal["mobilevit_block"]
    dim: PositiveInt
    """Channels of the input (and of the output)."""
    transformer_dim: PositiveInt
    """Width of the transformer that runs on the unfolded patches."""
    layers: PositiveInt = 2
    """Transformer layers (``depth`` would repeat the whole block)."""
    heads: PositiveInt = 4
    """Attention heads; they must divide `transformer_dim`."""
    patch: PositiveInt = 2
    """Unfold patch size: the map must be a multiple of it on both sides."""
    mlp_ratio: PositiveFloat = 2.0
    """Transformer MLP hidden width = int(transformer_dim * mlp_ratio)."""
    act: ConvAct = "silu"
    """Activation function."""
    norm_eps: PositiveFloat = 1e-5
    """LayerNorm epsilon."""
    drop_path: Rate = 0.0
    """Stochastic-depth rate of the residual branches (0: off)."""
    needs_size = False

    batch_norm = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image", channels=self.dim)
        ctx.divides(self.transformer_dim, self.heads, field="heads", what="head", of="transformer_dim")
        for axis, size in zip(("height", "width"), x.grid, strict=True):
            ctx.require(
                Constraint.divisible(size, self.patch),
                f"the map {axis} ({size}) is not divisible by the patch {self.patch}",
                field="patch",
            )
            ctx.positive(size, f"the map {axis}", field="patch")
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> MobileVitBlock:
        return MobileVitBlock(
            self.dim, self.transformer_dim, self.layers, self.heads, self.patch, self.mlp_ratio, self.act,
            self.norm_eps, self.drop_path, **ctx.dd,
        )  # fmt: skip

    def params(self, x: TensorType) -> int:
        d, t = self.dim, self.transformer_dim
        layers = self.layers * count.transformer_block(t, int(t * self.mlp_ratio))
        return (
            count.conv_bn(d, d, 3) + count.conv(d, t, 1, bias=False) + layers + count.norm(t) + count.conv_bn(t, d)
            + count.conv_bn(2 * d, d, 3)
        )  # fmt: skip


class MobileVitBlock(Module):
    """``conv_kxk``, ``conv_1x1``, ``transformer`` (ViT blocks), ``norm``, ``conv_proj``, ``conv_fusion``."""

    def __init__(
        self, dim, transformer_dim, depth=2, heads=4, patch=2, mlp_ratio=2.0, act="silu", eps=1e-5,
        drop_path_rate=0.0, device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch = patch
        self.conv_kxk = ConvBn(dim, dim, 3, 1, 1, act=act, init="fan_out_groups", **dd)
        self.conv_1x1 = conv2d(dim, transformer_dim, 1, bias=False, init="fan_out_groups", **dd)
        with init_elsewhere():  # the Linear layers are drawn below, as timm's ByobNet does
            self.transformer = nn.Sequential(*(
                VitBlock(transformer_dim, heads, mlp_ratio, True, drop_path_rate, eps=eps, act=act, **dd)
                for _ in range(depth)
            ))  # fmt: skip
        for layer in self.transformer.modules():
            if isinstance(layer, nn.Linear) and layer.weight.device.type != "meta":
                nn.init.normal_(layer.weight, std=0.01)  # timm ByobNet init
                nn.init.zeros_(layer.bias)
        self.norm = nn.LayerNorm(transformer_dim, eps=eps, **dd)
        self.conv_proj = ConvBn(transformer_dim, dim, 1, act=act, init="fan_out_groups", **dd)
        self.conv_fusion = ConvBn(2 * dim, dim, 3, 1, 1, act=act, init="fan_out_groups", **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        B, C, H, W = x.shape
        p = self.patch
        nh, nw = H // p, W // p
        # [B, C, H, W] -> [B*C*nh, nw, p, p] -> [B*p*p, nh*nw, C]: sequence position = patch index, batch = b*p*p + pos
        x = x.reshape(B * C * nh, p, nw, p).transpose(1, 2)
        x = x.reshape(B, C, nh * nw, p * p).transpose(1, 3).reshape(B * p * p, nh * nw, C)
        x = self.norm(self.transformer(x))
        x = x.contiguous().view(B, p * p, nh * nw, C).transpose(1, 3).reshape(B * C * nh, nw, p, p)
        x = x.transpose(1, 2).reshape(B, C, nh * p, nw * p)  # [B, C, H, W]
        return self.conv_fusion(torch.cat((shortcut, self.conv_proj(x)), dim=1))
