"""Deformable-DETR / DINO encoder layers (Zhu et al., "Deformable DETR", ICLR 2021; Zhang et al., "DINO", ICLR
2023): multi-scale deformable attention, the post-norm encoder over several feature levels, its sine position
embedding, and the per-level input projection (conv + GroupNorm)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockgraph.layers.common import Linear, activation, memo
from blockgraph.ops.ms_deform_attn import ms_deform_attn


class ConvGn(nn.Module):
    """``conv`` (xavier_uniform weight, zero bias, as the detectors init it) → ``norm`` (GroupNorm)."""

    def __init__(
        self, dim: int, dim_out: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 32,
        eps: float = 1e-5, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(dim, dim_out, kernel, stride, padding, **dd)
        if self.conv.weight.device.type != "meta":
            nn.init.xavier_uniform_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
        self.norm = nn.GroupNorm(groups, dim_out, eps=eps, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


def sine_position_embedding(
    mask: Tensor, features: int = 128, temperature: tuple[float, float] = (20.0, 20.0), offset: float = 0.0,
    scale: float = 2 * math.pi, eps: float = 1e-6, dtype: torch.dtype = torch.float32,
) -> Tensor:  # fmt: skip
    """The normalized sine position embedding of a padding mask ``[B, H, W]`` (True = padding) → ``[B, 2F, H, W]``:
    y channels first, then x, each interleaving sin/cos of one frequency. ``temperature`` is (y, x): DINO's
    ``PositionEmbeddingSineHW`` uses (20, 20) and ``offset`` 0; Deformable-DETR's ``PositionEmbeddingSine`` uses
    (10000, 10000) and ``offset`` -0.5. Computed in ``dtype`` (float32 in the references; float64 for a model in
    float64)."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=dtype)  # [B, H, W]
    x = not_mask.cumsum(2, dtype=dtype)
    y = (y + offset) / (y[:, -1:, :] + eps) * scale
    x = (x + offset) / (x[:, :, -1:] + eps) * scale
    index = torch.arange(features, dtype=dtype, device=mask.device)
    out = []
    for embed, t in ((y, temperature[0]), (x, temperature[1])):
        pos = embed[..., None] / t ** (2 * (index // 2) / features)  # [B, H, W, F]
        out.append(torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(3))
    return torch.cat(out, dim=3).permute(0, 3, 1, 2)  # [B, 2F, H, W]


# ------------------------------------------------------------------------------------------------ attention


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: ``value_proj``, ``sampling_offsets``, ``attention_weights``,
    ``output_proj``, initialized as Deformable-DETR's ``_reset_parameters`` (offsets start on a ring of directions,
    (p + 1) pixels out per point; uniform attention)."""

    def __init__(
        self, dim: int = 256, levels: int = 4, heads: int = 8, points: int = 4, device: Any = None, dtype: Any = None
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        dd = {"device": device, "dtype": dtype}
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = Linear(dim, heads * levels * points * 2, **dd)
        self.attention_weights = Linear(dim, heads * levels * points, **dd)
        self.value_proj = Linear(dim, dim, **dd)
        self.output_proj = Linear(dim, dim, **dd)
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
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
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
        out = ms_deform_attn(value, spatial_shapes, level_start_index, loc, weights)  # [N, Lq, M*D]
        return self.output_proj(out)


# -------------------------------------------------------------------------------------------------- encoder


class DeformableEncoderLayer(nn.Module):
    """Post-norm: ``norm1(x + attn(x + pos, ...))``, then ``norm2(x + linear2(act(linear1(x))))`` (DINO's names)."""

    def __init__(
        self, dim: int, ffn: int, levels: int, heads: int, points: int, dropout: float = 0.0, act: str = "relu",
        norm_eps: float = 1e-5, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.self_attn = MSDeformAttn(dim, levels, heads, points, **dd)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.linear1 = Linear(dim, ffn, **dd)
        self.activation = activation(act)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = Linear(ffn, dim, **dd)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(self.activation(self.linear1(src))))))


class DeformableEncoder(nn.Module):
    """``level_embed`` ``[L, C]`` and ``layers``; the bookkeeping (flattening, reference points, position
    embedding) happens in ``forward`` from the maps' sizes."""

    scriptable = False
    """No TorchScript form (its bookkeeping is cached Python per size, its core a choice of kernels): a model using
    it is compiled with torch.compile or exported (torch.export, ONNX)."""

    def __init__(
        self, dim: int = 256, levels: int = 4, heads: int = 8, points: int = 4, layers: int = 6, ffn: int = 2048,
        dropout: float = 0.0, act: str = "relu", norm_eps: float = 1e-5,
        pos_temperature: tuple[float, float] = (20.0, 20.0), pos_offset: float = 0.0, device: Any = None,
        dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim, self.levels = dim, levels
        self.temperature = tuple(pos_temperature)
        self.offset = pos_offset
        self.level_embed = nn.Parameter(torch.empty(levels, dim, **dd))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, ffn, levels, heads, points, dropout, act, norm_eps, **dd) for _ in range(layers)
        )
        self._layouts: dict[Any, tuple[Tensor, ...]] = {}
        self._ids: dict[Any, Tensor] = {}
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

    def forward(self, *inputs: Tensor | None, masks: list[Tensor] | None = None) -> tuple[Tensor, ...]:
        """``levels`` maps ``[B, C, h, w]``, optionally followed by the image's padding mask ``[B, H, W]`` (None: no
        padding), resized to each level as DETR does; or per-level ``masks``."""
        srcs: list[Tensor] = list(inputs[: self.levels])  # type: ignore[arg-type]
        if len(inputs) > self.levels and inputs[self.levels] is not None:
            image_mask = inputs[self.levels][None].float()  # type: ignore[index]
            masks = [F.interpolate(image_mask, size=s.shape[-2:]).to(torch.bool)[0] for s in srcs]
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

    def _layout(self, sizes, masks, device, dtype) -> tuple[Tensor, ...]:
        """The sine position embedding ``[B, S, C]``, reference points ``[B, S, L, 2]``, spatial shapes and level
        start index of maps of these sizes with these padding masks (``None``: no padding, and B is 1)."""
        masks = [torch.zeros(1, h, w, dtype=torch.bool, device=device) if m is None else m for m, (h, w) in
                 zip(masks, sizes, strict=True)]  # fmt: skip
        exact = torch.promote_types(dtype, torch.float32)  # float64 in a float64 model, else float32 (not bf16)
        pos = [sine_position_embedding(m, self.dim // 2, self.temperature, self.offset, dtype=exact) for m in masks]
        pos = torch.cat([p.flatten(2).transpose(1, 2) for p in pos], 1).to(dtype)  # [B, S, C]
        spatial_shapes = torch.as_tensor(sizes, dtype=torch.long, device=device)  # [L, 2] (h, w)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([_valid_ratio(m, exact) for m in masks], 1)  # [B, L, 2] (w, h)
        return pos, _reference_points(sizes, valid_ratios, device), spatial_shapes, level_start_index

    def _level_ids(self, sizes, device) -> Tensor:
        """Each token's level ``[S]``, to pick its row of ``level_embed``."""
        return memo(
            self._ids,
            (tuple(sizes), str(device)),
            lambda: torch.cat([torch.full((h * w,), k, device=device) for k, (h, w) in enumerate(sizes)]),
        )

    def _split(self, x: Tensor, sizes: list[tuple[int, int]]) -> tuple[Tensor, ...]:
        """The memory ``[B, S, C]`` and each level's map ``[B, C, h, w]``."""
        maps = []
        start = 0
        for h, w in sizes:
            maps.append(x[:, start : start + h * w].transpose(1, 2).reshape(x.shape[0], self.dim, h, w))
            start += h * w
        return (x, *maps)


def _valid_ratio(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(valid width / W, valid height / H) of a padding mask ``[B, H, W]`` (Deformable-DETR's order)."""
    _, H, W = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.to(dtype) / W, valid_h.to(dtype) / H], -1)


def _reference_points(sizes, valid_ratios: Tensor, device) -> Tensor:
    """Each query at its pixel centre, normalized by its own level's valid extent, mapped to every level."""
    points = []
    for level, (h, w) in enumerate(sizes):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))  # [B, h*w, 2]
    ref = torch.cat(points, 1)
    return ref[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]
