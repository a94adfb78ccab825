"""Token plumbing: cls-token insert/remove, and conversion between token sequences and maps (row-major tokens,
extra tokens first)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class InsertClsToken(nn.Module):
    """``[B, N, C]`` → ``[B, 1 + N, C]`` with the learned ``token`` at position ``at``."""

    def __init__(self, dim: int, at: int = 0, init_std: float = 0.02, device: Any = None, dtype: Any = None):
        super().__init__()
        self.at = at
        self.token = nn.Parameter(torch.zeros(1, 1, dim, device=device, dtype=dtype))
        if self.token.device.type != "meta" and init_std > 0:
            nn.init.trunc_normal_(self.token, std=init_std)

    def forward(self, x: Tensor) -> Tensor:
        token = self.token.expand(x.shape[0], -1, -1)
        return torch.cat((x[:, : self.at], token, x[:, self.at :]), dim=1) if self.at else torch.cat((token, x), 1)


class RemoveClsToken(nn.Module):
    """``[B, extra + N, C]`` → ``[B, N, C]``."""

    def __init__(self, extra: int = 1):
        super().__init__()
        self.extra = extra

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.extra :]


class TokensToMap(RemoveClsToken):
    """``[B, extra + h*w, C]`` → ``[B, C, h, w]`` (contiguous), dropping the ``extra`` tokens first."""

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:  # type: ignore[override]
        x = x[:, self.extra :]
        return x.reshape(x.shape[0], size[0], size[1], -1).permute(0, 3, 1, 2).contiguous()  # [B, C, h, w]


class MapToTokens(nn.Module):
    """``[B, C, h, w]`` → ``[B, h*w, C]``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)  # [B, h*w, C]
