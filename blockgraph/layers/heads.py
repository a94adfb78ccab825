"""Classification heads."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from blockgraph.layers.common import linear


def classifier(dim: int, num_classes: int, bias: bool = True, **dd: Any) -> nn.Module:
    """``Linear(dim, num_classes)``, or the identity for ``num_classes == 0`` (the pooled features)."""
    return linear(dim, num_classes, bias=bias, **dd) if num_classes else nn.Identity()


class ClsHead(nn.Module):
    """``norm`` → pool (the cls token, or the mean of the image tokens) → ``drop`` → ``fc`` (skipped with
    ``pre_logits``)."""

    def __init__(
        self, dim: int, num_classes: int, pool: str = "token", extra: int = 1, norm: bool = True,
        norm_eps: float = 1e-6, drop: float = 0.0, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.pool = pool
        self.extra = extra
        self.norm = nn.LayerNorm(dim, eps=norm_eps, **dd) if norm else nn.Identity()
        self.drop = nn.Dropout(drop)
        self.fc = classifier(dim, num_classes, **dd)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.pool == "token":  # the norm is per token: the cls token's alone
            x = self.drop(self.norm(x[:, 0]))
        else:
            x = self.drop(self.norm(x)[:, self.extra :].mean(dim=1))
        return x if pre_logits else self.fc(x)


class AvgPoolHead(nn.Module):
    """mean over H, W → ``drop`` → ``fc`` (skipped with ``pre_logits``)."""

    def __init__(self, dim: int, num_classes: int, drop: float = 0.0, device: Any = None, dtype: Any = None):
        super().__init__()
        self.drop = nn.Dropout(drop)
        self.fc = classifier(dim, num_classes, device=device, dtype=dtype)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)
