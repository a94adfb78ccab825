"""MPViT's multi-path layers (Lee et al., "MPViT: Multi-Path Vision Transformer for Dense Prediction", CVPR 2022):
the chained multi-scale patch embedding and the inverted-residual local path."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from blockgraph.layers.common import activation
from blockgraph.layers.conv import ConvBn, conv2d
from blockgraph.ops.conv import conv_bn


class DWConvBn(nn.Module):
    """``dwconv`` (depthwise, no bias) → ``pwconv`` (1x1, no bias) → ``bn`` → ``act``; no norm in between."""

    def __init__(
        self, dim: int, kernel: int = 3, stride: int = 1, act: str = "hardswish", bn_eps: float = 1e-5,
        device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dwconv = conv2d(dim, dim, kernel, stride, (kernel - 1) // 2, groups=dim, bias=False, init="fan_out", **dd)
        self.pwconv = conv2d(dim, dim, 1, bias=False, init="fan_out", **dd)
        self.bn = nn.BatchNorm2d(dim, eps=bn_eps, **dd)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn(self.dwconv(x), self.pwconv, self.bn, self.act)

    def script_forward(self, x: Tensor) -> Tensor:
        """TorchScript's: the layers themselves (conv_bn's plain reference)."""
        return self.act(self.bn(self.pwconv(self.dwconv(x))))


class PatchEmbedPath(nn.Module):
    """One path's embedding (``patch_conv``), as MPViT's ``DWCPatchEmbed``."""

    def __init__(self, dim: int, **kwargs: Any):
        super().__init__()
        self.patch_conv = DWConvBn(dim, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.patch_conv(x)


class MultiScalePatchEmbed(nn.Module):
    """``patch_embeds[k]``, each fed the previous one's output (only the first strides); returns every path's
    output."""

    def __init__(
        self, dim: int, paths: int, stride: int = 1, kernel: int = 3, act: str = "hardswish", bn_eps: float = 1e-5,
        device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        self.patch_embeds = nn.ModuleList(
            PatchEmbedPath(dim, kernel=kernel, stride=stride if k == 0 else 1, act=act, bn_eps=bn_eps, device=device,
                           dtype=dtype)
            for k in range(paths)
        )  # fmt: skip

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.script_forward(x))

    def script_forward(self, x: Tensor) -> list[Tensor]:
        outs: list[Tensor] = []
        for embed in self.patch_embeds:
            x = embed(x)
            outs.append(x)
        return outs


class InvResBlock(nn.Module):
    """``conv1`` (Conv-BN-act) → ``dwconv`` → ``norm`` → ``act`` → ``conv2`` (Conv-BN), plus the input; hidden width
    ``int(dim * expansion)``."""

    def __init__(
        self, dim: int, expansion: float = 1.0, act: str = "hardswish", bn_eps: float = 1e-5, device: Any = None,
        dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = int(dim * expansion)
        self.conv1 = ConvBn(dim, hidden, act=act, bn_eps=bn_eps, init="fan_out_groups", **dd)
        self.dwconv = conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False, init="fan_out_groups", **dd)
        self.norm = nn.BatchNorm2d(hidden, eps=bn_eps, **dd)
        self.act = activation(act)
        self.conv2 = ConvBn(hidden, dim, bn_eps=bn_eps, init="fan_out_groups", **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(conv_bn(self.conv1(x), self.dwconv, self.norm, self.act), residual=x)

    def script_forward(self, x: Tensor) -> Tensor:
        """TorchScript's: the layers themselves (conv_bn's plain reference)."""
        return self.conv2(self.act(self.norm(self.dwconv(self.conv1(x)))), residual=x)
