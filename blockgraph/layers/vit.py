"""Vision Transformer layers (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021) and DeiT's distilled
head (Touvron et al., "Training data-efficient image transformers", ICML 2021), in timm's layout."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockgraph.layers.common import DropPath, leading, linear, qkv_heads, residual_branch
from blockgraph.layers.heads import classifier
from blockgraph.layers.mlp import Mlp
from blockgraph.ops.kernel import symbolic_tracing


class PosEmbed(nn.Module):
    """``weight`` ``[1, extra + h*w, C]``, added to the tokens; with ``resample`` (an interpolation mode), the grid
    part is resized to other grids (timm's ``resample_abs_pos_embed``)."""

    def __init__(
        self, dim: int, grid: tuple[int, int], extra: int = 1, resample: Literal[False, "bilinear", "bicubic"] = False,
        init_std: float = 0.02,
        device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        self.grid = tuple(grid)
        self.extra = extra
        self.resample = resample or None
        self.weight = nn.Parameter(torch.zeros(1, extra + grid[0] * grid[1], dim, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.trunc_normal_(self.weight, std=init_std)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        resample = self.resample
        if symbolic_tracing() or (size[0], size[1]) == self.grid or resample is None:  # a trace: the built grid
            return x + self.weight
        prefix, grid = self.weight[:, : self.extra], self.weight[:, self.extra :]
        C = grid.shape[-1]
        grid = grid.reshape(1, self.grid[0], self.grid[1], C).permute(0, 3, 1, 2)  # [1, C, h, w]
        grid = F.interpolate(grid.float(), size=size, mode=resample, antialias=True, align_corners=False)
        grid = grid.to(self.weight.dtype).permute(0, 2, 3, 1).reshape(1, -1, C)  # [1, h'*w', C]
        return x + torch.cat((prefix, grid), dim=1)


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` → ``F.scaled_dot_product_attention`` → ``proj`` (timm's ``Attention``),
    then drop path and a residual add when given one."""

    def __init__(
        self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
        drop_path: float = 0.0, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.heads = heads
        self.attn_drop = attn_drop
        self.qkv = linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, residual: Tensor | None = None, queries: int | None = None) -> Tensor:
        """``residual + drop_path(attention(x))``. ``queries``: only the first ``queries`` tokens attend (every
        token is a key and a value), and only they are returned."""
        B, N, C = x.shape
        q, k, v = qkv_heads(x, self.qkv.weight, self.qkv.bias, self.heads, queries)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, N, d]
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, q.shape[2], C)  # [B, Nq, h*d]
        if torch.jit.is_scripting():
            y = self.drop_path(self.proj_drop(self.proj(x)))
            return y if residual is None else residual + y
        return residual_branch(self.proj, x, residual, self.proj_drop, self.drop_path)


class VitBlock(nn.Module):
    """``norm1``, ``attn``, ``norm2``, ``mlp`` (timm's names): ``x + DropPath(Attn(LN(x)))``, then
    ``x + DropPath(MLP(LN(x)))``. With ``keep``, only the first ``keep`` tokens are computed and returned: they
    attend to every token, the others are only keys and values."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
        proj_drop: float = 0.0, attn_drop: float = 0.0, norm_eps: float = 1e-6, act: str = "gelu",
        keep: int | None = None, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.keep = keep
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = Attention(dim, heads, qkv_bias, attn_drop, proj_drop, drop_path, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, mlp_ratio, act=act, drop=proj_drop, drop_path=drop_path, **dd)

    def forward(self, x: Tensor, full: bool = False) -> Tensor:
        keep = None if full else self.keep  # full: every token, for a reader other than the trimmed model's
        x = self.attn(self.norm1(x), residual=leading(x, keep), queries=keep)
        return self.mlp(self.norm2(x), residual=x)


class DistilledHead(nn.Module):
    """``norm`` → ``fc(x[:, 0])`` and ``fc_dist(x[:, 1])``: their average in eval; in training with ``train_both``,
    the pair ``(cls, dist)`` for the distillation loss."""

    def __init__(
        self, dim: int, num_classes: int, norm_eps: float = 1e-6, drop: float = 0.0, train_both: bool = True,
        device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.train_both = train_both
        self.norm = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.drop = nn.Dropout(drop)
        self.fc = classifier(dim, num_classes, **dd)
        self.fc_dist = classifier(dim, num_classes, **dd)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = self.drop(self.norm(x[:, :2]))
        if pre_logits:  # timm's: the mean of the two tokens
            return (x[:, 0] + x[:, 1]) / 2
        cls, dist = self.fc(x[:, 0]), self.fc_dist(x[:, 1])
        if self.training and self.train_both:
            return cls, dist
        return (cls + dist) / 2
