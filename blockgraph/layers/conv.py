"""Convolutional layers: Conv-BN-activation, and the concatenate-then-1x1 merge of parallel paths."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from blockgraph.layers.common import activation, uninitialized
from blockgraph.ops.conv import conv_bn


def init_conv(conv: nn.Conv2d, mode: str) -> None:
    """``fan_out``: normal(0, sqrt(2 / (k*k*out))) as MPViT's Conv2d_BN (no division by groups);
    ``fan_out_groups``: the same over ``out / groups`` (MPViT's ResBlock); ``default``: PyTorch's. A bias, if any,
    is zeroed (timm's ``_init_weights`` for these layers)."""
    if mode == "default" or conv.weight.device.type == "meta":
        return
    k = conv.kernel_size[0] * conv.kernel_size[1]
    fan_out = k * conv.out_channels / (conv.groups if mode == "fan_out_groups" else 1)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def conv2d(*args: Any, init: str = "default", **kwargs: Any) -> nn.Conv2d:
    """``nn.Conv2d(*args, **kwargs)`` with the weight init ``init`` (:func:`init_conv`), drawn once."""
    if init == "default":
        return nn.Conv2d(*args, **kwargs)
    conv = uninitialized(nn.Conv2d, *args, **kwargs)
    init_conv(conv, init)
    return conv


class ConvBn(nn.Module):
    """``conv`` (no bias) → ``bn`` → ``act`` (``Conv2d_BN`` in LeViT and MPViT), run by
    :func:`blockgraph.ops.conv.conv_bn` (the BatchNorm folded into the conv in eager inference)."""

    def __init__(
        self, dim: int, dim_out: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1,
        act: str = "identity", bn_eps: float = 1e-5, init: str = "fan_out", device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = conv2d(dim, dim_out, kernel, stride, padding, groups=groups, bias=False, init=init, **dd)
        self.bn = nn.BatchNorm2d(dim_out, eps=bn_eps, **dd)
        self.act = activation(act)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``act(bn(conv(x)))``, plus ``residual`` if given."""
        return conv_bn(x, self.conv, self.bn, self.act, residual)

    def script_forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """TorchScript's: the layers themselves (conv_bn's plain reference)."""
        y = self.act(self.bn(self.conv(x)))
        return y if residual is None else residual + y


class ConcatConvBn(ConvBn):
    """``torch.cat(inputs, dim=1)`` → ``conv`` (1x1) → ``bn`` → ``act``."""

    def __init__(
        self, dim: int, dim_out: int, act: str = "hardswish", bn_eps: float = 1e-5, init: str = "fan_out",
        device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__(dim, dim_out, act=act, bn_eps=bn_eps, init=init, device=device, dtype=dtype)

    script_packs_inputs = True

    def forward(self, *xs: Tensor) -> Tensor:  # type: ignore[override]  # any number of maps, no residual
        return super().forward(torch.cat(xs, dim=1))

    def script_forward(self, xs: list[Tensor]) -> Tensor:
        return self.act(self.bn(self.conv(torch.cat(xs, dim=1))))
