"""MobileViT layers (Mehta & Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision
Transformer", ICLR 2022), in timm's ByobNet layout: the MV2 inverted residual and the MobileViT block."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockgraph.layers.common import DropPath, init_elsewhere, residual_branch
from blockgraph.layers.conv import ConvBn, conv2d
from blockgraph.layers.vit import VitBlock
from blockgraph.ops.kernel import symbolic_tracing


class Mv2Block(nn.Module):
    """``conv1_1x1`` (expand to ``hidden``), ``conv2_kxk`` (depthwise, with the stride), ``conv3_1x1`` (project, no
    activation) (timm's BottleneckBlock names); the input is added back when the shapes allow."""

    def __init__(
        self, dim: int, dim_out: int, hidden: int, stride: int = 1, act: str = "silu", drop_path: float = 0.0,
        device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1_1x1 = ConvBn(dim, hidden, 1, act=act, init="fan_out_groups", **dd)
        self.conv2_kxk = ConvBn(hidden, hidden, 3, stride, 1, groups=hidden, act=act, init="fan_out_groups", **dd)
        self.conv3_1x1 = ConvBn(hidden, dim_out, 1, init="fan_out_groups", **dd)
        self.residual = stride == 1 and dim == dim_out
        if self.residual and self.conv3_1x1.bn.weight.device.type != "meta":
            nn.init.zeros_(self.conv3_1x1.bn.weight)  # timm's zero_init_last
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2_kxk(self.conv1_1x1(x))
        if torch.jit.is_scripting():
            y = self.drop_path(self.conv3_1x1(y))
            return x + y if self.residual else y
        return residual_branch(self.conv3_1x1, y, x if self.residual else None, self.drop_path)


class MobileVitBlock(nn.Module):
    """``conv_kxk``, ``conv_1x1``, ``transformer`` (ViT blocks over the unfolded patches), ``norm``,
    ``conv_proj``, ``conv_fusion`` (with the block's input, concatenated)."""

    def __init__(
        self, dim: int, transformer_dim: int, layers: int = 2, heads: int = 4, patch: int = 2,
        mlp_ratio: float = 2.0, act: str = "silu", norm_eps: float = 1e-5, drop_path: float = 0.0,
        interpolate: bool = True, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch = patch
        self.interpolate = interpolate
        self.conv_kxk = ConvBn(dim, dim, 3, 1, 1, act=act, init="fan_out_groups", **dd)
        self.conv_1x1 = conv2d(dim, transformer_dim, 1, bias=False, init="fan_out_groups", **dd)
        with init_elsewhere():  # the Linear layers are drawn below, as timm's ByobNet does
            self.transformer = nn.Sequential(*(
                VitBlock(transformer_dim, heads, mlp_ratio, drop_path=drop_path, norm_eps=norm_eps, act=act, **dd)
                for _ in range(layers)
            ))  # fmt: skip
        for layer in self.transformer.modules():
            if isinstance(layer, nn.Linear) and layer.weight.device.type != "meta":
                nn.init.normal_(layer.weight, std=0.01)  # timm ByobNet init
                nn.init.zeros_(layer.bias)
        self.norm = nn.LayerNorm(transformer_dim, eps=norm_eps, **dd)
        self.conv_proj = ConvBn(transformer_dim, dim, 1, act=act, init="fan_out_groups", **dd)
        self.conv_fusion = ConvBn(2 * dim, dim, 3, 1, 1, act=act, init="fan_out_groups", **dd)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        B, C, H, W = x.shape
        p = self.patch
        nh, nw = -(-H // p), -(-W // p)
        resized = self.interpolate and not symbolic_tracing() and (nh * p != H or nw * p != W)  # a trace: as built
        if resized:  # timm: up to the next multiple of the patch, and back after the transformer
            x = F.interpolate(x, size=(nh * p, nw * p), mode="bilinear", align_corners=False)
        # [B, C, H, W] -> [B*C*nh, nw, p, p] -> [B*p*p, nh*nw, C]: sequence position = patch index, batch = b*p*p + pos
        x = x.reshape(B * C * nh, p, nw, p).transpose(1, 2)
        x = x.reshape(B, C, nh * nw, p * p).transpose(1, 3).reshape(B * p * p, nh * nw, C)
        x = self.norm(self.transformer(x))
        x = x.contiguous().view(B, p * p, nh * nw, C).transpose(1, 3).reshape(B * C * nh, nw, p, p)
        x = x.transpose(1, 2).reshape(B, C, nh * p, nw * p)  # [B, C, nh*p, nw*p]
        if resized:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)  # [B, C, H, W]
        return self.conv_fusion(torch.cat((shortcut, self.conv_proj(x)), dim=1))
