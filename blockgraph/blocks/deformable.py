"""Deformable-DETR / DINO encoder primitives (Zhu et al., "Deformable DETR", ICLR 2021; Zhang et al., "DINO",
ICLR 2023): multi-scale deformable attention, the post-norm encoder over several feature levels, its sine
position embedding, and the per-level input projection (conv + GroupNorm)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate, activation, memo
from blockgraph.blocks.conv import Conv2dFields
from blockgraph.blocks.lazy import Module, fused, lazy_module, nn, torch
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType

ops = lazy_module("blockgraph.ops")


# ----------------------------------------------------------------------------------------- input projection


@register
class ConvGnSpec(Conv2dFields):
    """Conv2d (with bias) → GroupNorm: the per-level input projection of Deformable-DETR and DINO (1x1 on the
    backbone levels, 3x3 stride 2 for the extra level)."""

    op: Literal["conv_gn"]
    groups: PositiveInt = 32
    """GroupNorm groups."""
    eps: PositiveFloat = 1e-5
    """GroupNorm epsilon."""

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.divides(self.dim_out, self.groups, field="groups", what="GroupNorm group", of="dim_out")
        return self.out_type(ctx, x)

    def build(self, ctx: BuildContext, x: TensorType) -> ConvGn:
        return ConvGn(x.channels, self.dim_out, self.kernel, self.stride, self.pad, self.groups, self.eps, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.conv(x.channels, self.dim_out, self.kernel) + count.norm(self.dim_out)


class ConvGn(Module):
    """``conv`` (xavier_uniform weight, zero bias, as the detectors init it) → ``norm`` (GroupNorm)."""

    def __init__(self, dim, dim_out, kernel=1, stride=1, padding=0, groups=32, eps=1e-5, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(dim, dim_out, kernel, stride, padding, **dd)
        if self.conv.weight.device.type != "meta":
            nn.init.xavier_uniform_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
        self.norm = nn.GroupNorm(groups, dim_out, eps=eps, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


# ------------------------------------------------------------------------------------------- sine embedding


def sine_position_embedding(
    mask: torch.Tensor, features: int = 128, temperature: tuple[float, float] = (20.0, 20.0), offset: float = 0.0,
    scale: float = 2 * math.pi, eps: float = 1e-6,
) -> torch.Tensor:  # fmt: skip
    """The normalized sine position embedding of a padding mask ``[B, H, W]`` (True = padding) → ``[B, 2F, H, W]``:
    y channels first, then x, each interleaving sin/cos of one frequency. ``temperature`` is (y, x): DINO's
    ``PositionEmbeddingSineHW`` uses (20, 20) and ``offset`` 0; Deformable-DETR's ``PositionEmbeddingSine`` uses
    (10000, 10000) and ``offset`` -0.5."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)  # [B, H, W]
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = (y + offset) / (y[:, -1:, :] + eps) * scale
    x = (x + offset) / (x[:, :, -1:] + eps) * scale
    index = torch.arange(features, dtype=torch.float32, device=mask.device)
    out = []
    for embed, t in ((y, temperature[0]), (x, temperature[1])):
        pos = embed[..., None] / t ** (2 * (index // 2) / features)  # [B, H, W, F]
        out.append(torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(3))
    return torch.cat(out, dim=3).permute(0, 3, 1, 2)  # [B, 2F, H, W]


# ------------------------------------------------------------------------------------------------ attention


class MSDeformAttn(Module):
    """Multi-scale deformable attention: ``value_proj``, ``sampling_offsets``, ``attention_weights``,
    ``output_proj``, initialized as Deformable-DETR's ``_reset_parameters`` (offsets start on a ring of directions,
    (p + 1) pixels out per point; uniform attention)."""

    def __init__(self, dim=256, levels=4, heads=8, points=4, device=None, dtype=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        dd = {"device": device, "dtype": dtype}
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = fused.Linear(dim, heads * levels * points * 2, **dd)
        self.attention_weights = fused.Linear(dim, heads * levels * points, **dd)
        self.value_proj = fused.Linear(dim, dim, **dd)
        self.output_proj = fused.Linear(dim, dim, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.value_proj.weight.device.type == "meta":
            return
        M, L, P = self.heads, self.levels, self.points
        with torch.no_grad():
            nn.init.zeros_(self.sampling_offsets.weight)
            thetas = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)
            grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [M, 2], float32 as the original
            grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(M, 1, 1, 2).repeat(1, L, P, 1)
            for p in range(P):
                grid[:, :, p, :] *= p + 1
            self.sampling_offsets.bias.copy_(grid.view(-1))
            nn.init.zeros_(self.attention_weights.weight)
            nn.init.zeros_(self.attention_weights.bias)
            for layer in (self.value_proj, self.output_proj):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query ``[N, Lq, C]``; reference_points ``[N, Lq, L, 2]`` (x, y) or ``[N, Lq, L, 4]`` (cx, cy, w, h), in
        [0, 1] of the padded maps; input_flatten ``[N, S, C]``; padding_mask ``[N, S]`` (True = padding)."""
        N, Lq, C = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.heads, self.levels, self.points
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, S, M, C // M)  # [N, S, M, D]
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)  # (W, H) per level
            loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            loc = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points must end in 2 or 4 values, got {reference_points.shape[-1]}")
        out = ops.ms_deform_attn(value, spatial_shapes, level_start_index, loc, weights)  # [N, Lq, M*D]
        return self.output_proj(out)


# -------------------------------------------------------------------------------------------------- encoder


class DeformableEncoderLayer(Module):
    """Post-norm: ``norm1(x + attn(x + pos, ...))``, then ``norm2(x + linear2(act(linear1(x))))`` (DINO's names)."""

    def __init__(self, dim, ffn, levels, heads, points, dropout=0.0, act="relu", eps=1e-5, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.self_attn = MSDeformAttn(dim, levels, heads, points, **dd)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps, **dd)
        self.linear1 = fused.Linear(dim, ffn, **dd)
        self.activation = activation(act)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = fused.Linear(ffn, dim, **dd)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps, **dd)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(self.activation(self.linear1(src))))))


@register
class DeformableEncoderSpec(BlockSpec):
    """A multi-scale deformable encoder over ``levels`` maps (DINO's 4-scale encoder by default): flatten the levels
    in order, add the sine position embedding plus a learned level embedding, run ``layers`` post-norm deformable
    layers from pixel-centre reference points, and split the memory back into maps.

    Outputs: ``memory`` (all levels' tokens) and ``l0`` ... (each level's map, the input's size).
    """

    op: Literal["deformable_encoder"]
    dim: PositiveInt = 256
    """Model width (d_model) of every level and of the memory."""
    levels: PositiveInt = 4
    """Feature levels (inputs) the attention samples from."""
    heads: PositiveInt = 8
    """Attention heads; they must divide `dim`."""
    points: PositiveInt = 4
    """Sampling points per head and level."""
    layers: PositiveInt = 6
    """Encoder layers."""
    ffn: PositiveInt = 2048
    """Hidden width of each layer's feed-forward network."""
    dropout: Rate = 0.0
    """Dropout after the attention and in the feed-forward network (training only)."""
    act: Literal["relu", "gelu"] = "relu"
    """Activation of the feed-forward network."""
    norm_eps: PositiveFloat = 1e-5
    """LayerNorm epsilon (post-norm)."""
    pos_temperature: tuple[PositiveFloat, PositiveFloat] = (20.0, 20.0)
    """(y, x) temperatures of the sine embedding: DINO (20, 20); Deformable-DETR (10000, 10000)."""
    pos_offset: float = 0.0
    """DINO 0.0; Deformable-DETR -0.5."""
    arity = None

    def output_ports(self) -> tuple[str, ...]:
        return ("memory", *(f"l{k}" for k in range(self.levels)))

    def infer(self, ctx: InferContext, *xs: TensorType) -> dict[str, TensorType]:
        if len(xs) != self.levels:
            ctx.fail(f"{len(xs)} inputs for `levels: {self.levels}`", field="from", hint=f"set `levels: {len(xs)}`")
        ctx.divides(self.dim, self.heads, field="heads", what="head")
        for k, x in enumerate(xs):
            ctx.expect(x, layout="image", channels=self.dim, what=f"level {k}")
            ctx.positive(x.grid[0], f"level {k}'s height", field="from")
            ctx.positive(x.grid[1], f"level {k}'s width", field="from")
        memory = TensorType.multilevel(self.dim, [x.grid for x in xs])
        return {"memory": memory, **{f"l{k}": x for k, x in enumerate(xs)}}

    def build(self, ctx: BuildContext, *xs: TensorType) -> DeformableEncoder:
        return DeformableEncoder(
            self.dim, self.levels, self.heads, self.points, self.layers, self.ffn, self.dropout, self.act,
            self.norm_eps, self.pos_temperature, self.pos_offset, **ctx.dd,
        )  # fmt: skip

    def params(self, *xs: TensorType) -> int:
        d, samples = self.dim, self.heads * self.levels * self.points
        attn = count.linear(d, 2 * samples) + count.linear(d, samples) + 2 * count.linear(d, d)
        layer = attn + 2 * count.norm(d) + count.mlp(d, self.ffn)
        return self.levels * d + self.layers * layer


class DeformableEncoder(Module):
    """``level_embed`` ``[L, C]`` and ``layers``; the bookkeeping (flattening, reference points, position
    embedding) happens in ``forward`` from the maps' sizes."""

    def __init__(
        self, dim=256, levels=4, heads=8, points=4, layers=6, ffn=2048, dropout=0.0, act="relu", eps=1e-5,
        temperature=(20.0, 20.0), offset=0.0, device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.temperature = tuple(temperature)
        self.offset = offset
        self.level_embed = nn.Parameter(torch.empty(levels, dim, **dd))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, ffn, levels, heads, points, dropout, act, eps, **dd) for _ in range(layers)
        )
        self._layouts: dict[Any, tuple[torch.Tensor, ...]] = {}
        self._ids: dict[Any, torch.Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DeformableTransformer._reset_parameters: xavier_uniform on every matrix, then each attention's own init,
        then normal level embeddings."""
        if self.level_embed.device.type == "meta":
            return
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.layers:
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, *srcs: torch.Tensor, masks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        sizes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        x = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)  # [B, S, C]
        if masks is None:  # no padding: everything but the tokens depends on the sizes alone, made once per size
            key = (tuple(sizes), str(x.device), x.dtype)
            pos, reference_points, spatial_shapes, level_start_index = memo(
                self._layouts, key, lambda: self._layout(sizes, [None] * len(sizes), x.device, x.dtype)
            )
            mask_flatten = None
        else:
            pos, reference_points, spatial_shapes, level_start_index = self._layout(sizes, masks, x.device, x.dtype)
            mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        pos = pos + self.level_embed[self._level_ids(sizes, x.device)]  # [B or 1, S, C]
        for layer in self.layers:
            x = layer(x, pos, reference_points, spatial_shapes, level_start_index, mask_flatten)
        return self._split(x, sizes)

    def _layout(self, sizes, masks, device, dtype) -> tuple[torch.Tensor, ...]:
        """The sine position embedding ``[B, S, C]``, reference points ``[B, S, L, 2]``, spatial shapes and level
        start index of maps of these sizes with these padding masks (``None``: no padding, and B is 1)."""
        masks = [torch.zeros(1, h, w, dtype=torch.bool, device=device) if m is None else m for m, (h, w) in
                 zip(masks, sizes, strict=True)]  # fmt: skip
        pos = [sine_position_embedding(m, self.dim // 2, self.temperature, self.offset).to(dtype) for m in masks]
        pos = torch.cat([p.flatten(2).transpose(1, 2) for p in pos], 1)  # [B, S, C]
        spatial_shapes = torch.as_tensor(sizes, dtype=torch.long, device=device)  # [L, 2] (h, w)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([_valid_ratio(m) for m in masks], 1)  # [B, L, 2] (w, h)
        return pos, _reference_points(sizes, valid_ratios, device), spatial_shapes, level_start_index

    def _level_ids(self, sizes, device) -> torch.Tensor:
        """Each token's level ``[S]``, to pick its row of ``level_embed``."""
        return memo(
            self._ids,
            (tuple(sizes), str(device)),
            lambda: torch.cat([torch.full((h * w,), k, device=device) for k, (h, w) in enumerate(sizes)]),
        )

    def _split(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        """The memory ``[B, S, C]`` and each level's map ``[B, C, h, w]``."""
        maps = []
        start = 0
        for h, w in sizes:
            maps.append(x[:, start : start + h * w].transpose(1, 2).reshape(x.shape[0], self.dim, h, w))
            start += h * w
        return (x, *maps)


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(valid width / W, valid height / H) of a padding mask ``[B, H, W]``, float32 (Deformable-DETR's order)."""
    _, H, W = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / W, valid_h.float() / H], -1)


def _reference_points(sizes, valid_ratios: torch.Tensor, device) -> torch.Tensor:
    """Each query at its pixel centre, normalized by its own level's valid extent, mapped to every level."""
    points = []
    for level, (h, w) in enumerate(sizes):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))  # [B, h*w, 2]
    ref = torch.cat(points, 1)
    return ref[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]
