"""MPViT's multi-path primitives (Lee et al., "MPViT: Multi-Path Vision Transformer for Dense Prediction", CVPR
2022): the chained multi-scale patch embedding and the inverted-residual local path. The paths' encoders are
``serial_block`` chains (CoaT's conv-attention, here without a cls token), declared as ``paths:`` of a stage."""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, activation
from blockgraph.blocks.conv import ConvAct, ConvBn, conv2d
from blockgraph.blocks.lazy import Module, fused, nn, torch
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType


@register
class MultiScalePatchEmbedSpec(BlockSpec):
    """``paths`` depthwise-separable Conv-BN-act embeddings, **chained**: path k embeds path k-1's output, so the
    paths see 3x3, 5x5, 7x7... receptive fields; only the first strides. Outputs ``p0``, ``p1``, ..."""

    op: Literal["multi_scale_patch_embed"]
    dim: PositiveInt
    """Channels in and out."""
    paths: PositiveInt
    """Number of chained embeddings; their outputs are ports p0, p1, ..."""
    stride: PositiveInt = 1
    """Stride of the first path's embedding (the others keep the size)."""
    kernel: PositiveInt = 3
    """Depthwise kernel of every path's embedding."""
    act: ConvAct = "hardswish"
    """Activation function."""
    bn_eps: PositiveFloat = 1e-5
    """BatchNorm epsilon."""

    batch_norm = True

    def output_ports(self) -> tuple[str, ...]:
        return tuple(f"p{k}" for k in range(self.paths))

    def infer(self, ctx: InferContext, x: TensorType) -> dict[str, TensorType]:
        ctx.expect(x, layout="image", channels=self.dim)
        grid = ctx.conv2d(x, self.kernel, self.stride, field="stride")
        return {port: TensorType.image(self.dim, *grid) for port in self.output_ports()}

    def build(self, ctx: BuildContext, x: TensorType) -> MultiScalePatchEmbed:
        return MultiScalePatchEmbed(self.dim, self.paths, self.stride, self.kernel, self.act, self.bn_eps, **ctx.dd)

    def params(self, x: TensorType) -> int:
        depthwise = count.conv(self.dim, self.dim, self.kernel, groups=self.dim, bias=False)
        return self.paths * (depthwise + count.conv_bn(self.dim, self.dim))


class DWConvBn(Module):
    """``dwconv`` (depthwise, no bias) → ``pwconv`` (1x1, no bias) → ``bn`` → ``act``; no norm in between."""

    def __init__(self, dim, kernel=3, stride=1, act="hardswish", eps=1e-5, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dwconv = conv2d(dim, dim, kernel, stride, (kernel - 1) // 2, groups=dim, bias=False, init="fan_out", **dd)
        self.pwconv = conv2d(dim, dim, 1, bias=False, init="fan_out", **dd)
        self.bn = nn.BatchNorm2d(dim, eps=eps, **dd)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(self):  # the BatchNorm folded into pwconv
            return fused.conv_bn(self.dwconv(x), self.pwconv, self.bn, self.act)
        return self.act(self.bn(self.pwconv(self.dwconv(x))))


class PatchEmbedPath(Module):
    """One path's embedding (``patch_conv``), as MPViT's ``DWCPatchEmbed``."""

    def __init__(self, dim, kernel=3, stride=1, act="hardswish", eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.patch_conv = DWConvBn(dim, kernel, stride, act, eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_conv(x)


class MultiScalePatchEmbed(Module):
    """``patch_embeds[k]``, each fed the previous one's output; returns every path's output."""

    def __init__(self, dim, paths, stride=1, kernel=3, act="hardswish", eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.patch_embeds = nn.ModuleList(
            PatchEmbedPath(dim, kernel, stride if k == 0 else 1, act, eps, device=device, dtype=dtype)
            for k in range(paths)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for embed in self.patch_embeds:
            x = embed(x)
            outs.append(x)
        return tuple(outs)


@register
class InvResBlockSpec(BlockSpec):
    """MPViT's local path: ``x + Conv1x1-BN(act(BN(DWConv3x3(Conv1x1-BN-act(x)))))`` (an inverted residual with
    hidden width = ``dim * expansion``)."""

    op: Literal["inv_res_block"]
    dim: PositiveInt
    """Channels of the input (and of the output)."""
    expansion: PositiveFloat = 1.0
    """Hidden width = int(dim x expansion)."""
    act: ConvAct = "hardswish"
    """Activation function."""
    bn_eps: PositiveFloat = 1e-5
    """BatchNorm epsilon."""

    batch_norm = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="image", channels=self.dim)
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> InvResBlock:
        return InvResBlock(self.dim, int(self.dim * self.expansion), self.act, self.bn_eps, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.inverted_residual(self.dim, int(self.dim * self.expansion), self.dim)


class InvResBlock(Module):
    """``conv1`` (Conv-BN-act) → ``dwconv`` → ``norm`` → ``act`` → ``conv2`` (Conv-BN), plus the input."""

    def __init__(self, dim, hidden, act="hardswish", eps=1e-5, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = ConvBn(dim, hidden, act=act, eps=eps, init="fan_out_groups", **dd)
        self.dwconv = conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False, init="fan_out_groups", **dd)
        self.norm = nn.BatchNorm2d(hidden, eps=eps, **dd)
        self.act = activation(act)
        self.conv2 = ConvBn(hidden, dim, eps=eps, init="fan_out_groups", **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(self):  # the BatchNorm folded into dwconv; the residual added in place
            return self.conv2(fused.conv_bn(self.conv1(x), self.dwconv, self.norm, self.act)).add_(x)
        return x + self.conv2(self.act(self.norm(self.dwconv(self.conv1(x)))))
