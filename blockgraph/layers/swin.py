"""Swin Transformer layers (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021), in timm's layout: window attention with a relative position bias, cyclic-shift windows with the -100
attention mask, and patch merging."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockgraph.layers.common import DropPath, linear, memo, qkv_heads
from blockgraph.layers.mlp import Mlp
from blockgraph.ops.kernel import symbolic_tracing


def relative_position_index(window: int) -> Tensor:
    """``[w*w, w*w]`` index into the ``(2w-1)^2`` bias table: ``(dy + w - 1) * (2w - 1) + (dx + w - 1)``."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [w*w, w*w, 2] (dy, dx)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _regions(n: int, s: int, window: int, device: torch.device | None) -> Tensor:
    """Each position's region along an axis of ``n`` shifted by ``s`` (see :func:`shift_mask`): 0, 1 or 2."""
    i = torch.arange(n, device=device)
    return ((i >= n - window).long() + (i >= n - s).long()) if s else torch.zeros_like(i)


def shift_mask(h: int, w: int, window: int, shift: int | tuple[int, int], device: torch.device | None = None) -> Tensor:
    """The -100 mask ``[nW, w*w, w*w]`` between tokens that came from different regions before the cyclic shift.

    Along an axis of size n shifted by s > 0 the regions are ``[0, n - window)``, ``[n - window, n - s)``,
    ``[n - s, n)`` (timm's slices); an axis that is not shifted is one region. A token's label is row region * 3 +
    column region. Written as comparisons, not as slice assignments, so that under torch.compile it is one small
    kernel (the nine assignments made inductor generate megabytes of C++ for Swin-T).
    """
    shifts = (shift, shift) if isinstance(shift, int) else shift
    labels = _regions(h, shifts[0], window, device)[:, None] * 3 + _regions(w, shifts[1], window, device)[None, :]
    windows = labels.view(h // window, window, w // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    diff = windows[:, None, :] - windows[:, :, None]  # [nW, w*w, w*w]
    return diff.ne(0).to(torch.float32) * -100.0


class WindowAttention(nn.Module):
    """``qkv`` → softmax attention with ``scale``, the relative position bias (and the shift mask) added to the
    logits → ``proj``; bias from ``relative_position_bias_table`` ``[(2w-1)^2, heads]`` (timm's layout).

    The attention is the explicit math, not ``F.scaled_dot_product_attention``: for 49-token windows with a float
    bias it is the faster of the two, eagerly and under torch.compile (inductor fuses the bias add into the softmax
    and runs the products as bmm); with a bias that needs a gradient SDPA would run this math anyway. Outside
    autograd the bias, or bias + shift mask, is built once per map size and reused until the table changes (its
    version counter and storage are part of the key).
    """

    def __init__(
        self, dim: int, heads: int, window: int, qkv_bias: bool = True, attn_drop: float = 0.0,
        proj_drop: float = 0.0, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.heads = heads
        self.window = window
        self.scale = (dim // heads) ** -0.5
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads, **dd))
        if self.relative_position_bias_table.device.type != "meta":
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.relative_position_index: Tensor
        self.register_buffer("relative_position_index", relative_position_index(window).to(device), persistent=False)
        self.qkv = linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self._bias_cache: dict[Any, Tensor] = {}

    def attention_bias(self, mask: Tensor | None = None, key: Any = None) -> Tensor:
        """The logits' bias: ``[1, heads, N, N]``, or ``[nW, heads, N, N]`` with the shift ``mask`` ``[nW, N, N]``
        added. ``key`` names the mask (the map size) for the cache; ``None`` computes it afresh."""
        table = self.relative_position_bias_table
        if key is not None and not symbolic_tracing() and not (torch.is_grad_enabled() and table.requires_grad):
            stamp = (key, table._version, table.data_ptr(), table.dtype, str(table.device))
            return memo(self._bias_cache, stamp, lambda: self._bias(mask))
        return self._bias(mask)

    def _bias(self, mask: Tensor | None) -> Tensor:
        table = self.relative_position_bias_table
        N = self.window * self.window
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            bias = bias + mask[:, None].to(bias.dtype)  # [nW, heads, N, N]
        return bias.contiguous()

    def forward(self, x: Tensor, mask: Tensor | None = None, key: Any = None) -> Tensor:
        return self._attend(x, self.attention_bias(mask, key))

    def script_forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """TorchScript's: the bias made on every call (no cache)."""
        return self._attend(x, self._bias(mask))

    def _attend(self, x: Tensor, bias: Tensor) -> Tensor:
        """Attention within windows ``x`` ``[Bw, N, C]`` with the logits' ``bias`` ``[windows or 1, h, N, N]``."""
        Bw, N, C = x.shape  # Bw = B * windows
        q, k, v = qkv_heads(x, self.qkv.weight, self.qkv.bias, self.heads)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [Bw, h, N, d]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [Bw, h, N, N], fresh: the bias is added in place
        # per window, not repeated for every image; the sum is read back (a graph that drops unread results keeps it)
        attn = attn.view(-1, bias.shape[0], self.heads, N, N).add_(bias).view(Bw, self.heads, N, N)
        x = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(Bw, N, C)))  # [Bw, N, h*d]


class SwinBlock(nn.Module):
    """``norm1``, ``attn``, ``norm2``, ``mlp`` (timm's names), on row-major tokens of an ``h x w`` map.

    An axis is shifted when the map is longer than one window along it (timm). With ``pad``, a map that does not
    divide into windows is zero-padded at the bottom and right after the shift, the shift mask made over the padded
    map, and the result cropped back (timm's Swin built with ``strict_img_size=False``, whose padding tokens take
    part in the attention as zeros: only the shift is masked); which axes shift is then fixed by ``size``, the map
    the model is built for, as timm fixes it at construction.

    With ``size`` a shifted block keeps that map's shift mask as the buffer ``attn_mask`` (not in the state_dict),
    as timm does: under torch.compile it is then an input of the graph, not a computation traced into it (inductor
    fused that index arithmetic into the softmax, per head and image). Other sizes make and cache theirs on first
    use.
    """

    def __init__(
        self, dim: int, heads: int, window: int = 7, shift: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True,
        drop_path: float = 0.0, proj_drop: float = 0.0, attn_drop: float = 0.0, norm_eps: float = 1e-5,
        act: str = "gelu", pad: bool = False, size: tuple[int, int] | None = None, device: Any = None,
        dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.window, self.shift, self.pad = window, shift, pad
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = WindowAttention(dim, heads, window, qkv_bias, attn_drop, proj_drop, **dd)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, mlp_ratio, act=act, drop=proj_drop, drop_path=drop_path, **dd)
        self._masks: dict[tuple[Any, ...], Tensor] = {}
        self.built_shifts = self._axis_shifts(*size) if pad and size is not None else None
        shifts = self._shifts(*size) if size is not None else (0, 0)
        self.mask_key = (*map(self._padded, size), shifts) if size is not None and any(shifts) else None
        mask = shift_mask(*self.mask_key[:2], window, shifts, device) if self.mask_key else None
        self.attn_mask: Tensor
        self.register_buffer("attn_mask", mask, persistent=False)

    def _padded(self, n: int) -> int:
        return n + (-n) % self.window

    def _axis_shifts(self, h: int, w: int) -> tuple[int, int]:
        """The shift along each axis of an ``h x w`` map: none along an axis of at most one window (timm)."""
        return (self.shift if h > self.window else 0, self.shift if w > self.window else 0)

    def _shifts(self, h: int, w: int) -> tuple[int, int]:
        built = self.built_shifts
        if built is not None:
            return built
        if not torch.jit.is_scripting():
            if symbolic_tracing():  # the sizes are symbols: the shifts (and mask) of the size the model is built for
                return self.mask_key[2] if self.mask_key is not None else (0, 0)
        return self._axis_shifts(h, w)

    def _mask(self, hp: int, wp: int, shifts: tuple[int, int], device: Any) -> Tensor:
        """The shift mask for this (padded) map size and shift: the buffer's, or computed once per size and
        device."""
        if symbolic_tracing() or ((hp, wp, shifts) == self.mask_key and self.attn_mask.device == device):
            return self.attn_mask
        return memo(self._masks, (hp, wp, shifts, str(device)), lambda: shift_mask(hp, wp, self.window, shifts, device))

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        B, L, C = x.shape
        h, w = size
        win = self.window
        shifts = self._shifts(h, w)
        shifted = shifts[0] != 0 or shifts[1] != 0
        y = self.norm1(x).view(B, h, w, C)
        if shifted:
            y = torch.roll(y, shifts=(-shifts[0], -shifts[1]), dims=(1, 2))
        hp, wp = (self._padded(h), self._padded(w)) if self.pad else (h, w)
        if (hp, wp) != (h, w):
            y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h))
        y = y.view(B, hp // win, win, wp // win, win, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, win * win, C)
        if torch.jit.is_scripting():  # (no cache: the mask made on every call)
            y = self.attn(y, shift_mask(hp, wp, win, shifts, x.device) if shifted else None)
        else:
            mask = self._mask(hp, wp, shifts, x.device) if shifted else None
            y = self.attn(y, mask, (hp, wp, shifts))  # [B*nW, win*win, C]
        y = y.view(B, hp // win, wp // win, win, win, C).permute(0, 1, 3, 2, 4, 5).reshape(B, hp, wp, C)
        if (hp, wp) != (h, w):
            y = y[:, :h, :w]
        if shifted:
            y = torch.roll(y, shifts=shifts, dims=(1, 2))
        x = x + self.drop_path(y.reshape(B, L, C))
        return self.mlp(self.norm2(x), residual=x)


class PatchMerging(nn.Module):
    """Each 2x2 group of tokens concatenated (``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]``) →
    ``norm`` (LayerNorm 4C) → ``reduction`` (Linear 4C → dim_out, no bias); odd maps are zero-padded (timm)."""

    def __init__(self, dim: int, dim_out: int, norm_eps: float = 1e-5, device: Any = None, dtype: Any = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps, **dd)
        self.reduction = linear(4 * dim, dim_out, bias=False, **dd)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        B, _, C = x.shape
        h, w = size
        x = x.view(B, h, w, C)
        if not symbolic_tracing() and (h % 2 != 0 or w % 2 != 0):  # (a trace: an even map, as Swin's windows make it)
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        x = x.reshape(B, h // 2, 2, w // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)  # [B, h/2, w/2, 4C]
        return self.reduction(self.norm(x)).flatten(1, 2)  # [B, h/2 * w/2, dim_out]
