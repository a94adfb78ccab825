"""The transformer MLP (timm's ``Mlp`` layout)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from blockgraph.layers.common import DropPath, activation, linear, residual_branch


class Mlp(nn.Module):
    """``fc1`` → act → ``drop1`` → ``fc2`` → ``drop2`` over the last dimension; then drop path and a residual add
    when given one (a block's MLP branch: ``residual + drop_path(mlp(x))``)."""

    def __init__(
        self, dim: int, mlp_ratio: float = 4.0, dim_out: int | None = None, act: str = "gelu", drop: float = 0.0,
        drop_path: float = 0.0, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = int(dim * mlp_ratio)
        self.fc1 = linear(dim, hidden, **dd)
        self.act = activation(act)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = linear(hidden, dim_out or dim, **dd)
        self.drop2 = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if torch.jit.is_scripting():  # (the script view's Linear takes no activation to fuse)
            y = self.drop_path(self.drop2(self.fc2(self.drop1(self.act(self.fc1(x))))))
            return y if residual is None else residual + y
        x = self.drop1(self.fc1(x, act=self.act))
        return residual_branch(self.fc2, x, residual, self.drop2, self.drop_path)
