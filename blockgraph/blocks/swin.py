"""Swin Transformer primitives (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021), in timm's layout: window attention with a relative position bias, cyclic-shift windows with
the -100 attention mask on alternating blocks, and patch merging at the start of stages 2-4."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate, drop_path, linear, memo
from blockgraph.blocks.coat import check_heads
from blockgraph.blocks.lazy import F, Module, fused, nn, torch
from blockgraph.blocks.mlp import Activation, Mlp
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import Constraint, TensorType

# --------------------------------------------------------------------------------------------------- the block


@register
class SwinBlockSpec(BlockSpec):
    """Swin block on tokens ``[B, h*w, C]`` (row-major): ``x + DropPath(W-MSA(LN(x)))`` with windows of ``window``
    x ``window`` tokens, cyclically shifted by ``shift`` (0 for regular windows), then ``x + DropPath(MLP(LN(x)))``.

    The map must divide into windows: ``h % window == 0`` and ``h >= window`` (likewise ``w``), checked statically.
    As timm, a block whose map is exactly one window does not shift.
    """

    op: Literal["swin_block"]
    dim: PositiveInt
    """Channels of the input (and of the output)."""
    heads: PositiveInt
    """Attention heads; they must divide `dim`."""
    window: PositiveInt = 7
    """Window size in tokens per side: the map must be a multiple of it."""
    shift: NonNegativeInt = 0
    """Cyclic shift of the windows (0, or window // 2 on alternate blocks); a map of one window is not shifted."""
    mlp_ratio: PositiveFloat = 4.0
    """MLP hidden width = int(dim * mlp_ratio)."""
    qkv_bias: bool = True
    """Bias on the q, k, v projection."""
    drop_path: Rate = 0.0
    """Stochastic-depth rate of the residual branches (0: off)."""
    proj_drop: Rate = 0.0
    """Dropout after the output projection and in the MLP (training only)."""
    attn_drop: Rate = 0.0
    """Dropout on the attention weights (training only)."""
    norm_eps: PositiveFloat = 1e-5
    """LayerNorm epsilon."""
    act: Activation = "gelu"
    """Activation function."""
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim, extra=0)
        check_heads(ctx, self.dim, self.heads)
        if self.shift >= self.window:
            ctx.fail(
                f"shift {self.shift} must be smaller than the window {self.window}",
                field="shift",
                hint=f"Swin shifts every second block by half a window: `shift: {self.window // 2}` (or 0)",
            )
        for axis, size in zip(("height", "width"), x.grid, strict=True):
            ctx.require(
                Constraint.ge(size, self.window),
                f"the map {axis} ({size}) is smaller than the window {self.window}",
                field="window",
            )
            ctx.require(
                Constraint.divisible(size, self.window),
                f"the map {axis} ({size}) is not divisible by the window {self.window}",
                field="window",
            )
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> SwinBlock:
        h, w = (ctx.at_input_size(size) for size in x.grid)  # the map at the spec's input: its mask is made now
        return SwinBlock(
            self.dim, self.heads, self.window, self.shift, self.mlp_ratio, self.qkv_bias, self.drop_path,
            self.proj_drop, self.attn_drop, self.norm_eps, self.act, size=None if h is None else (h, w), **ctx.dd,
        )  # fmt: skip

    def params(self, x: TensorType) -> int:
        table = (2 * self.window - 1) ** 2 * self.heads  # the relative position bias
        return count.transformer_block(self.dim, int(self.dim * self.mlp_ratio), self.qkv_bias) + table


def relative_position_index(window: int) -> torch.Tensor:
    """``[w*w, w*w]`` index into the ``(2w-1)^2`` bias table: ``(dy + w - 1) * (2w - 1) + (dx + w - 1)``."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [w*w, w*w, 2] (dy, dx)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shift_mask(h: int, w: int, window: int, shift: int, device=None) -> torch.Tensor:
    """The -100 mask ``[nW, w*w, w*w]`` between tokens that came from different regions before the cyclic shift.

    Along each axis of size n the regions are ``[0, n - window)``, ``[n - window, n - shift)``, ``[n - shift, n)``
    (timm's slices); a token's label is row region * 3 + column region. Written as comparisons, not as slice
    assignments, so that under torch.compile it is one small kernel (the nine assignments made inductor generate
    megabytes of C++ for Swin-T, 94 s of compile against timm's 59 s).
    """

    def regions(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - window).long() + (i >= n - shift).long()

    labels = regions(h)[:, None] * 3 + regions(w)[None, :]  # [h, w]
    windows = labels.view(h // window, window, w // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    diff = windows[:, None, :] - windows[:, :, None]  # [nW, w*w, w*w]
    return diff.ne(0).to(torch.float32) * -100.0


class WindowAttention(Module):
    """``qkv`` → softmax attention with ``scale``, the relative position bias (and the shift mask) added to the
    logits → ``proj``; bias from ``relative_position_bias_table`` ``[(2w-1)^2, heads]`` (timm's layout).

    The attention is the explicit math, not ``F.scaled_dot_product_attention``: for 49-token windows with a float
    bias it is the faster of the two, eagerly and under torch.compile (numbers at the code). Outside autograd (eval
    under ``no_grad``/``inference_mode``) the bias, or bias + shift mask, is built once per map size and reused
    until the table changes (its version counter and storage are part of the key).
    """

    def __init__(self, dim, heads, window, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.heads = heads
        self.window = window
        self.scale = (dim // heads) ** -0.5
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads, **dd))
        if self.relative_position_bias_table.device.type != "meta":
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window).to(device), persistent=False)
        self.qkv = linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self._bias_cache: dict[Any, torch.Tensor] = {}

    def attention_bias(self, mask: torch.Tensor | None = None, key: Any = None) -> torch.Tensor:
        """The logits' bias: ``[1, heads, N, N]``, or ``[nW, heads, N, N]`` with the shift ``mask`` ``[nW, N, N]``
        added. ``key`` names the mask (the map size) for the cache; ``None`` computes it afresh."""
        table = self.relative_position_bias_table
        if key is not None and not (torch.is_grad_enabled() and table.requires_grad):
            stamp = (key, table._version, table.data_ptr(), table.dtype, str(table.device))
            return memo(self._bias_cache, stamp, lambda: self.attention_bias(mask))
        N = self.window * self.window
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            bias = bias + mask[:, None].to(bias.dtype)  # [nW, heads, N, N]
        return bias.contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, key: Any = None) -> torch.Tensor:
        Bw, N, C = x.shape  # Bw = B * windows
        fast = fused.enabled(self)
        qkv = fused.linear(x, self.qkv) if fast else self.qkv(x)
        q, k, v = qkv.reshape(Bw, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # [Bw, h, N, d]
        bias = self.attention_bias(mask, key)  # [windows or 1, h, N, N]
        # The explicit math, not SDPA, at 49-token windows: eagerly 1.0 vs 1.75 ms for the 64 windows of stage 1 at
        # batch 1 (SDPA's flash kernel); compiled, inductor fuses the bias add into the softmax and the products go
        # to bmm (Swin-T at batch 1: 0.99-1.01 of timm's compiled time, 1.02-1.06 through SDPA). With a bias that
        # needs a gradient SDPA would run this math anyway.
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [Bw, h, N, N]
        per_window = attn.view(-1, bias.shape[0], self.heads, N, N)  # the bias is not repeated for every image
        if fast:
            per_window.add_(bias)
        else:
            attn = (per_window + bias).view(Bw, self.heads, N, N)
        x = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training) @ v
        x = x.transpose(1, 2).reshape(Bw, N, C)  # [Bw, N, h*d]
        return fused.linear(x, self.proj) if fast else self.proj_drop(self.proj(x))


class SwinBlock(Module):
    """``norm1``, ``attn``, ``norm2``, ``mlp`` (timm's names), on row-major tokens of an ``h x w`` map.

    With ``size`` (the map the model is built for) a shifted block keeps that map's shift mask as the buffer
    ``attn_mask`` (not in the state_dict), as timm does: under torch.compile it is then an input of the graph, not a
    computation traced into it (inductor fused that index arithmetic into the softmax, per head and image: Swin-T's
    shifted blocks took 3x as long). Other sizes make and cache theirs on first use.
    """

    def __init__(
        self, dim, heads, window=7, shift=0, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, proj_drop=0.0,
        attn_drop=0.0, eps=1e-5, act="gelu", size=None, device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim, eps=eps, **dd)
        self.attn = WindowAttention(dim, heads, window, qkv_bias, attn_drop, proj_drop, **dd)
        self.drop_path = drop_path(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=eps, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=proj_drop, **dd)
        self._masks: dict[tuple[int, int, str], torch.Tensor] = {}
        self.mask_size = tuple(size) if size is not None and self._shift(*size) else None
        mask = shift_mask(*self.mask_size, window, shift, device) if self.mask_size else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _shift(self, h: int, w: int) -> int:
        """The shift on an ``h x w`` map: none when the map is one window (timm)."""
        return self.shift if min(h, w) > self.window else 0

    def _mask(self, h: int, w: int, shift: int, device) -> torch.Tensor:
        """The shift mask for this map size: the buffer's, or computed once per size and device."""
        if (h, w) == self.mask_size and self.attn_mask.device == device:
            return self.attn_mask
        return memo(self._masks, (h, w, str(device)), lambda: shift_mask(h, w, self.window, shift, device))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, L, C = x.shape
        h, w = size
        win = self.window
        shift = self._shift(h, w)
        y = self.norm1(x).view(B, h, w, C)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = y.view(B, h // win, win, w // win, win, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, win * win, C)
        mask = self._mask(h, w, shift, x.device) if shift else None
        y = self.attn(y, mask, (h, w, shift))  # [B*nW, win*win, C]
        y = y.view(B, h // win, w // win, win, win, C).permute(0, 1, 3, 2, 4, 5).reshape(B, h, w, C)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(B, L, C))
        if fused.enabled(self):  # the residual add happens in fc2's epilogue
            return self.mlp(self.norm2(x), residual=x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------------------------- patch merging


@register
class PatchMergingSpec(BlockSpec):
    """Swin's patch merging: each 2x2 group of tokens concatenated (``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
    x[1::2, 1::2]``), LayerNorm(4C), then Linear(4C, ``dim_out``, no bias); odd maps are zero-padded (timm)."""

    op: Literal["patch_merging"]
    dim: PositiveInt
    """Channels of the input tokens (the output has `dim_out`, default 2 x dim)."""
    dim_out: PositiveInt | None = None
    """Default: 2 * dim."""
    norm_eps: PositiveFloat = 1e-5
    """LayerNorm epsilon."""
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim, extra=0)
        h, w = ((size + 1) // 2 for size in x.grid)
        return TensorType.tokens(self.dim_out or 2 * self.dim, h, w)

    def build(self, ctx: BuildContext, x: TensorType) -> PatchMerging:
        return PatchMerging(self.dim, self.dim_out or 2 * self.dim, self.norm_eps, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.norm(4 * self.dim) + count.linear(4 * self.dim, self.dim_out or 2 * self.dim, bias=False)


class PatchMerging(Module):
    """``norm`` (LayerNorm 4C) → ``reduction`` (Linear 4C → dim_out, no bias)."""

    def __init__(self, dim, dim_out, eps=1e-5, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(4 * dim, eps=eps, **dd)
        self.reduction = linear(4 * dim, dim_out, bias=False, **dd)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, _, C = x.shape
        h, w = size
        x = x.view(B, h, w, C)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        x = x.reshape(B, h // 2, 2, w // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)  # [B, h/2, w/2, 4C]
        x = self.norm(x)
        x = fused.linear(x, self.reduction) if fused.enabled(self) else self.reduction(x)
        return x.flatten(1, 2)  # [B, h/2 * w/2, dim_out]
