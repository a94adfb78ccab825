"""Convolutional patch embedding (timm's ``PatchEmbed`` layout)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class ConvPatchEmbed(nn.Module):
    """``proj`` (Conv2d, kernel = stride = patch) → flatten to tokens → ``norm``."""

    def __init__(
        self, in_chans: int, dim: int, patch: int, norm: bool = True, norm_eps: float = 1e-5, bias: bool = True,
        flatten: bool = True, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch, bias=bias, **dd)
        self.norm = nn.LayerNorm(dim, eps=norm_eps, **dd) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # [B, C, h, w]
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return self.norm(x)
