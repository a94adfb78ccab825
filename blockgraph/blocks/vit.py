"""Vision Transformer primitives (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021) and DeiT's
distillation head (Touvron et al., "Training data-efficient image transformers", ICML 2021)."""

from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate, drop_path, leading, linear, split_qkv
from blockgraph.blocks.coat import check_heads
from blockgraph.blocks.lazy import F, Module, fused, nn, torch
from blockgraph.blocks.mlp import Activation, Mlp
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import Constraint, TensorType

# ------------------------------------------------------------------------------------------- position embedding


@register
class PosEmbedSpec(BlockSpec):
    """Learned absolute position embedding added to the tokens; the extra (cls, dist) tokens have rows of their own.

    The embedding covers a fixed token ``grid``: other input sizes are rejected statically, unless ``resample`` names
    an interpolation, in which case the grid part is resized to the input's grid in ``forward`` (timm's
    ``resample_abs_pos_embed``).
    """

    op: Literal["pos_embed"]
    dim: PositiveInt
    """Channels of the input (and of the output)."""
    grid: tuple[PositiveInt, PositiveInt]
    """The token grid (h, w) the embedding was made for (14 x 14 for a 224 input with patch 16)."""
    resample: Literal[False, "bilinear", "bicubic"] = False
    """``false``: only the spec's grid is accepted; otherwise interpolate the embedding to other grids."""
    init_std: PositiveFloat = 0.02
    """Init: trunc_normal(std)."""
    needs_size = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        if not self.resample:
            gh, gw = self.grid
            stride = x.stride()
            native = f" (input {gh * stride}x{gw * stride})" if stride else ""
            for axis, (size, want) in enumerate(zip(x.grid, self.grid, strict=True)):
                ctx.require(
                    Constraint.eq(size, want),
                    f"the position embedding covers a {gh}x{gw} token grid{native}, but the "
                    f"{'height' if axis == 0 else 'width'} gives {size} tokens",
                    field="grid",
                    hint="set `resample: bicubic` on this block to interpolate the embedding to other sizes",
                )
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> PosEmbed:
        return PosEmbed(self.dim, self.grid, x.extra, self.resample or None, self.init_std, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return (x.extra + self.grid[0] * self.grid[1]) * self.dim


class PosEmbed(Module):
    """``weight`` ``[1, extra + h*w, C]``, added to the tokens (resampled when the grid differs and allowed)."""

    def __init__(self, dim, grid, extra=1, mode=None, init_std=0.02, device=None, dtype=None):
        super().__init__()
        self.grid = tuple(grid)
        self.extra = extra
        self.mode = mode
        self.weight = nn.Parameter(torch.zeros(1, extra + grid[0] * grid[1], dim, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.trunc_normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(size) == self.grid or self.mode is None:
            return x + self.weight
        prefix, grid = self.weight[:, : self.extra], self.weight[:, self.extra :]
        C = grid.shape[-1]
        grid = grid.reshape(1, self.grid[0], self.grid[1], C).permute(0, 3, 1, 2)  # [1, C, h, w]
        grid = F.interpolate(grid.float(), size=size, mode=self.mode, antialias=True, align_corners=False)
        grid = grid.to(self.weight.dtype).permute(0, 2, 3, 1).reshape(1, -1, C)  # [1, h'*w', C]
        return x + torch.cat((prefix, grid), dim=1)


# ------------------------------------------------------------------------------------------------------- block


@register
class VitBlockSpec(BlockSpec):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``; softmax
    attention through ``F.scaled_dot_product_attention``."""

    op: Literal["vit_block"]
    dim: PositiveInt
    """Channels of the input (and of the output)."""
    heads: PositiveInt
    """Attention heads; they must divide `dim`."""
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
    norm_eps: PositiveFloat = 1e-6
    """LayerNorm epsilon."""
    act: Activation = "gelu"
    """Activation function."""
    trims_tokens = True

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        check_heads(ctx, self.dim, self.heads)
        return x

    def build(self, ctx: BuildContext, x: TensorType) -> VitBlock:
        return VitBlock(
            self.dim, self.heads, self.mlp_ratio, self.qkv_bias, self.drop_path, self.proj_drop, self.attn_drop,
            self.norm_eps, self.act, keep=ctx.keep_tokens, **ctx.dd,
        )  # fmt: skip

    def params(self, x: TensorType) -> int:
        return count.transformer_block(self.dim, int(self.dim * self.mlp_ratio), self.qkv_bias)


class Attention(Module):
    """Multi-head self-attention: ``qkv`` → SDPA → ``proj`` (timm's ``Attention`` layout)."""

    def __init__(self, dim, heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.heads = heads
        self.attn_drop = attn_drop
        self.qkv = linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, queries: int | None = None
    ) -> torch.Tensor:
        """Attention over ``x``, plus ``residual`` if given (eval mode only; see ``Mlp.forward``). ``queries``: only
        the first ``queries`` tokens attend (every token is a key and a value), and only they are returned."""
        B, N, C = x.shape
        fast = fused.enabled(self)
        if queries is None:
            qkv = fused.linear(x, self.qkv) if fast else self.qkv(x)
            q, k, v = qkv.reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # [B,h,N,d]
        else:
            q, k, v = split_qkv(self.qkv, x, self.heads, queries, fast)
            N = queries
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # [B, N, h*d]
        if fast:
            return fused.linear(x, self.proj, residual=residual)
        x = self.proj_drop(self.proj(x))
        return x if residual is None else residual + x


class VitBlock(Module):
    """``norm1``, ``attn``, ``norm2``, ``mlp`` (timm's names). With ``keep``, only the first ``keep`` tokens are
    computed and returned: they attend to every token, the others are only keys and values."""

    def __init__(
        self, dim, heads, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, proj_drop=0.0, attn_drop=0.0, eps=1e-6,
        act="gelu", keep=None, device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.keep = keep
        self.norm1 = nn.LayerNorm(dim, eps=eps, **dd)
        self.attn = Attention(dim, heads, qkv_bias, attn_drop, proj_drop, **dd)
        self.drop_path = drop_path(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=eps, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=proj_drop, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.keep  # None, or compute the first `keep` tokens only (queries); every token is a key and value
        if fused.enabled(self):  # the residual adds happen in the projections' epilogues
            x = self.attn(self.norm1(x), residual=leading(x, keep), queries=keep)
            return self.mlp(self.norm2(x), residual=x)
        x = leading(x, keep) + self.drop_path(self.attn(self.norm1(x), queries=keep))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------------------------- distilled head


@register
class DistilledHeadSpec(BlockSpec):
    """DeiT's distilled head: norm, then ``fc`` on the cls token and ``fc_dist`` on the distillation token.

    In eval it returns their average; in training with ``train_both`` it returns the pair ``(cls, dist)`` (each of
    the static type), for the distillation loss.
    """

    op: Literal["distilled_head"]
    dim: PositiveInt
    """Channels of the tokens."""
    num_classes: NonNegativeInt
    """Classes; 0 gives the pooled features (no classifier)."""
    norm_eps: PositiveFloat = 1e-6
    """LayerNorm epsilon."""
    drop: Rate = 0.0
    """Dropout before the classifier (training only)."""
    train_both: bool = True
    """In training, return (cls logits, dist logits) for the distillation loss; in eval, their average."""

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout="tokens", channels=self.dim)
        if x.extra < 2:
            ctx.fail(
                f"a distilled head reads the cls and dist tokens, but the tokens carry {x.extra} extra token(s)",
                field="from",
                hint="insert the dist token with `op: insert_cls_token, at: 1`",
            )
        return TensorType.vector(self.num_classes or self.dim)

    def reads_tokens(self, x: TensorType) -> int:
        return 2  # cls and dist

    def build(self, ctx: BuildContext, x: TensorType) -> DistilledHead:
        return DistilledHead(self.dim, self.num_classes, self.norm_eps, self.drop, self.train_both, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.norm(self.dim) + (2 * count.linear(self.dim, self.num_classes) if self.num_classes else 0)


class DistilledHead(Module):
    """``norm`` → ``fc(x[:, 0])`` and ``fc_dist(x[:, 1])``."""

    def __init__(self, dim, num_classes, eps=1e-6, drop=0.0, train_both=True, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.train_both = train_both
        self.norm = nn.LayerNorm(dim, eps=eps, **dd)
        self.drop = nn.Dropout(drop)
        self.fc = linear(dim, num_classes, **dd) if num_classes else nn.Identity()
        self.fc_dist = linear(dim, num_classes, **dd) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(x[:, :2])
        cls, dist = self.fc(self.drop(x[:, 0])), self.fc_dist(self.drop(x[:, 1]))
        if self.training and self.train_both:
            return cls, dist
        return (cls + dist) / 2
