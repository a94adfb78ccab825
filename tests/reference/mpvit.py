"""Plain-PyTorch reference implementation of MPViT, used as a parity oracle.

Lee, Kim, Willette, Hwang, "MPViT: Multi-Path Vision Transformer for Dense Prediction", CVPR 2022
(arXiv:2112.11010). The module structure, attribute names (and therefore the ``state_dict`` keys, including the
aliases of the shared CPE/CRPE modules), initialization and forward math mirror the official ``mpvit.py``
(youngwanLEE/MPViT) as documented in ``shared/reference/ARCHITECTURES.md`` section 3 (and 2.4/2.5 for the
CRPE and factorized-attention math).

This file is deliberately independent of the ``blockgraph`` package: it must not import from it.

Quirks reproduced on purpose (see ARCHITECTURES.md 3.2 and 3.5):

- the multi-scale patch embeds of a stage are *chained* 3x3 depthwise-separable convs; only path 0 is strided,
  and only in stages 2-4;
- the local (``InvRes``) path consumes the *first* patch-embed output, and the concatenation order is
  local first, then paths 0..P-1;
- ``aggregate`` maps to ``embed_dims[i + 1]`` (``embed_dims[3]`` for the last stage);
- no cls token (CPE/CRPE act on all tokens, no zero row), no final norm, avg pool + Linear head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Cls_head",
    "ConvPosEnc",
    "ConvRelPosEnc",
    "Conv2d_BN",
    "DWCPatchEmbed",
    "DWConv2d_BN",
    "DropPath",
    "FactorAtt_ConvRelPosEnc",
    "MHCABlock",
    "MHCAEncoder",
    "MHCA_stage",
    "MPViT",
    "Mlp",
    "Patch_Embed_stage",
    "ResBlock",
    "dpr_generator",
    "mpvit_base",
    "mpvit_small",
    "mpvit_tiny",
    "mpvit_xsmall",
]

DEFAULT_CRPE_WINDOW: dict[int, int] = {3: 2, 5: 3, 7: 3}


def _crpe_window(window: dict[int, int] | None) -> dict[int, int]:
    return dict(DEFAULT_CRPE_WINDOW if window is None else window)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at inference or with ``drop_prob == 0``)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Conv2d_BN(nn.Module):  # noqa: N801 - official class name
    """Conv (no bias) -> BatchNorm2d -> optional activation (MPViT paper Sec. 3, conv side uses BN + Hardswish).

    Init (official): conv weight ~ N(0, sqrt(2 / (k*k*out_ch))) with no division by groups; BN weight =
    ``bn_weight_init``, bias 0.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 1,
        stride: int = 1,
        pad: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, pad, dilation, groups, bias=False)
        self.bn = norm_layer(out_ch)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0.0)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(mean=0.0, std=math.sqrt(2.0 / fan_out))
        self.act_layer = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act_layer(self.bn(self.conv(x)))


class DWConv2d_BN(nn.Module):  # noqa: N801 - official class name
    """Depthwise-separable conv: dw kxk (groups=out_ch) -> pw 1x1 -> BN -> act (MPViT Sec. 3.1 patch embedding).

    There is no norm/activation between the depthwise and pointwise convs. Both convs are bias-free and
    initialized N(0, sqrt(2 / (k*k*out_ch))) (no groups division); BN weight = ``bn_weight_init``, bias 0.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 1,
        stride: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] | None = nn.Hardswish,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(
            in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=out_ch, bias=False
        )  # [out_ch, in_ch/out_ch, k, k]
        self.pwconv = nn.Conv2d(out_ch, out_ch, 1, 1, 0, bias=False)
        self.bn = norm_layer(out_ch)
        self.act = act_layer() if act_layer is not None else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0.0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(bn_weight_init)
                m.bias.data.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x = self.dwconv(x)
        x = self.pwconv(x)
        x = self.bn(x)
        return self.act(x)


class DWCPatchEmbed(nn.Module):
    """Depthwise-convolutional patch embedding (MPViT Sec. 3.1): one ``DWConv2d_BN`` named ``patch_conv``."""

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 768,
        patch_size: int = 16,
        stride: int = 1,
        act_layer: type[nn.Module] = nn.Hardswish,
    ) -> None:
        super().__init__()
        self.patch_conv = DWConv2d_BN(in_chans, embed_dim, kernel_size=patch_size, stride=stride, act_layer=act_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.patch_conv(x)  # [B, C, H', W']


class Patch_Embed_stage(nn.Module):  # noqa: N801 - official class name
    """Multi-scale patch embedding of one stage (MPViT Sec. 3.1, Fig. 3).

    ``num_path`` 3x3 ``DWCPatchEmbed`` modules applied in a *chain* (path k consumes path k-1's output), so the
    paths see 3x3, 5x5, 7x7, ... receptive fields. Only path 0 is strided (stride 2), and only when ``isPool``.
    Returns every path's output; all have the same spatial size.
    """

    def __init__(self, embed_dim: int, num_path: int = 4, isPool: bool = False) -> None:  # noqa: N803
        super().__init__()
        self.patch_embeds = nn.ModuleList(
            [
                DWCPatchEmbed(
                    in_chans=embed_dim,
                    embed_dim=embed_dim,
                    patch_size=3,
                    stride=2 if isPool and idx == 0 else 1,
                )
                for idx in range(num_path)
            ]
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        att_inputs: list[Tensor] = []
        for pe in self.patch_embeds:
            x = pe(x)  # [B, C, H', W']
            att_inputs.append(x)
        return att_inputs


class ConvPosEnc(nn.Module):
    """Convolutional position encoding without cls token (CoaT Sec. 4 / MPViT Sec. 3.2): y = DWConv(x) + x."""

    def __init__(self, dim: int, k: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)  # [C, 1, k, k] + bias

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        H, W = size
        assert N == H * W
        feat = x.transpose(1, 2).reshape(B, C, H, W)  # [B, C, H, W]
        x = self.proj(feat) + feat  # [B, C, H, W]
        return x.flatten(2).transpose(1, 2)  # [B, N, C]


class ConvRelPosEnc(nn.Module):
    """Convolutional relative position encoding (CoaT Sec. 4.1), applied to all N = H*W tokens (no cls row).

    EV = q (elementwise) DWConv(v), with the head channels split per ``window`` = {kernel: num_heads}, in dict
    insertion order (default {3: 2, 5: 3, 7: 3}: heads 0-1 k=3, heads 2-4 k=5, heads 5-7 k=7). q is unscaled.
    """

    def __init__(self, Ch: int, h: int, window: int | dict[int, int]) -> None:  # noqa: N803
        super().__init__()
        if isinstance(window, int):  # one window size for all heads
            window = {window: h}
        self.window = dict(window)
        assert sum(window.values()) == h, "CRPE head splits must cover all heads"
        self.Ch = Ch
        self.h = h
        self.conv_list = nn.ModuleList()
        self.head_splits: list[int] = []
        for cur_window, cur_head_split in window.items():
            dilation = 1
            padding_size = (cur_window + (cur_window - 1) * (dilation - 1)) // 2
            cur_conv = nn.Conv2d(
                cur_head_split * Ch,
                cur_head_split * Ch,
                kernel_size=(cur_window, cur_window),
                padding=(padding_size, padding_size),
                dilation=(dilation, dilation),
                groups=cur_head_split * Ch,
            )  # [split*Ch, 1, k, k] + bias
            self.conv_list.append(cur_conv)
            self.head_splits.append(cur_head_split)
        self.channel_splits = [x * Ch for x in self.head_splits]

    def forward(self, q: Tensor, v: Tensor, size: tuple[int, int]) -> Tensor:
        B, h, N, Ch = q.shape
        H, W = size
        assert N == H * W
        # channel index = head * Ch + c
        v_img = v.permute(0, 1, 3, 2).reshape(B, h * Ch, H, W)  # [B, h*Ch, H, W]
        v_img_list = torch.split(v_img, self.channel_splits, dim=1)
        conv_v_img = torch.cat(
            [conv(x) for conv, x in zip(self.conv_list, v_img_list, strict=True)], dim=1
        )  # [B, h*Ch, H, W]
        conv_v = conv_v_img.reshape(B, h, Ch, N).permute(0, 1, 3, 2)  # [B, h, N, Ch]
        return q * conv_v  # [B, h, N, Ch]


class FactorAtt_ConvRelPosEnc(nn.Module):  # noqa: N801 - official class name
    """Factorized attention with convolutional relative position encoding (CoaT Sec. 4 / MPViT Sec. 3.2).

    out = proj(merge_heads(Ch^-0.5 * q (softmax_N(k)^T v) + CRPE(q, v))); the scale multiplies only the
    factorized term. ``attn_drop`` is constructed but unused, as in the official code.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        shared_crpe: ConvRelPosEnc | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.crpe = shared_crpe

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # [3, B, h, N, Ch]
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, h, N, Ch]
        k_softmax = k.softmax(dim=2)  # softmax over tokens, [B, h, N, Ch]
        k_softmax_T_dot_v = k_softmax.transpose(-2, -1) @ v  # [B, h, Ch, Ch]
        factor_att = q @ k_softmax_T_dot_v  # [B, h, N, Ch]
        assert self.crpe is not None
        crpe = self.crpe(q, v, size=size)  # [B, h, N, Ch]
        x = self.scale * factor_att + crpe  # [B, h, N, Ch]
        x = x.transpose(1, 2).reshape(B, N, C)  # [B, N, C], channel = head*Ch + c
        x = self.proj(x)
        return self.proj_drop(x)


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> GELU (exact) -> dropout -> fc2 -> dropout."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class MHCABlock(nn.Module):
    """Multi-head conv-attention block (MPViT Sec. 3.2): [CPE] -> x + FA(LN1(x)) -> x + MLP(LN2(x)).

    ``cpe`` and ``crpe`` are the encoder's shared modules, registered here (and in ``factoratt_crpe``) as
    attribute aliases, exactly as in the official code, so the ``state_dict`` contains the alias keys.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 3,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        norm_eps: float = 1e-6,
        shared_cpe: ConvPosEnc | None = None,
        shared_crpe: ConvRelPosEnc | None = None,
    ) -> None:
        super().__init__()
        self.cpe = shared_cpe
        self.crpe = shared_crpe
        self.factoratt_crpe = FactorAtt_ConvRelPosEnc(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, shared_crpe=shared_crpe
        )
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if self.cpe is not None:
            x = self.cpe(x, size)  # [B, N, C]; replaces the residual stream
        cur = self.norm1(x)
        x = x + self.drop_path(self.factoratt_crpe(cur, size))
        cur = self.norm2(x)
        return x + self.drop_path(self.mlp(cur))  # [B, N, C]


class MHCAEncoder(nn.Module):
    """One transformer path of a stage (MPViT Sec. 3.2): ``num_layers`` MHCABlocks sharing one CPE and one CRPE.

    Input tokens ``[B, H*W, C]``; output reshaped to ``[B, C, H, W]``.
    """

    def __init__(
        self,
        dim: int,
        num_layers: int = 1,
        num_heads: int = 8,
        mlp_ratio: float = 3,
        drop_path_list: Sequence[float] | None = None,
        qk_scale: float | None = None,
        crpe_window: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        drop_path_list = list(drop_path_list) if drop_path_list is not None else [0.0] * num_layers
        self.num_layers = num_layers
        self.cpe = ConvPosEnc(dim, k=3)
        self.crpe = ConvRelPosEnc(Ch=dim // num_heads, h=num_heads, window=_crpe_window(crpe_window))
        self.MHCA_layers = nn.ModuleList(
            [
                MHCABlock(
                    dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    drop_path=drop_path_list[idx],
                    qk_scale=qk_scale,
                    shared_cpe=self.cpe,
                    shared_crpe=self.crpe,
                )
                for idx in range(num_layers)
            ]
        )

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        H, W = size
        B = x.shape[0]
        for layer in self.MHCA_layers:
            x = layer(x, (H, W))  # [B, N, C]
        return x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]


class ResBlock(nn.Module):
    """Local-feature path ``InvRes`` (MPViT Sec. 3.3): x + conv2(act(BN(dw3x3(conv1(x))))), hidden width = C.

    Its own init runs over all its convs after construction: N(0, sqrt(2 / (k*k*out/groups))), BN 1/0.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.Hardswish,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.conv1 = Conv2d_BN(in_features, hidden_features, act_layer=act_layer)
        self.dwconv = nn.Conv2d(
            hidden_features, hidden_features, 3, 1, 1, bias=False, groups=hidden_features
        )  # [C, 1, 3, 3]
        self.norm = norm_layer(hidden_features)
        self.act = act_layer()
        self.conv2 = Conv2d_BN(hidden_features, out_features)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            fan_out //= m.groups
            m.weight.data.normal_(0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1.0)
            m.bias.data.zero_()

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        feat = self.conv1(x)
        feat = self.dwconv(feat)
        feat = self.norm(feat)
        feat = self.act(feat)
        feat = self.conv2(feat)
        return identity + feat  # [B, C, H, W]


class MHCA_stage(nn.Module):  # noqa: N801 - official class name
    """Multi-path transformer + local-conv stage with global-to-local feature interaction (MPViT Sec. 3.2-3.3).

    outputs = [InvRes(inputs[0])] + [encoder_k(tokens(inputs[k])) for k in 0..P-1], concatenated along channels
    (local first), then ``aggregate`` = 1x1 Conv2d_BN + Hardswish to ``out_embed_dim``.
    """

    def __init__(
        self,
        embed_dim: int,
        out_embed_dim: int,
        num_layers: int = 1,
        num_heads: int = 8,
        mlp_ratio: float = 3,
        num_path: int = 4,
        drop_path_list: Sequence[float] | None = None,
        crpe_window: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.mhca_blks = nn.ModuleList(
            [
                MHCAEncoder(
                    embed_dim,
                    num_layers,
                    num_heads,
                    mlp_ratio,
                    drop_path_list=drop_path_list,
                    crpe_window=crpe_window,
                )
                for _ in range(num_path)
            ]
        )
        self.InvRes = ResBlock(in_features=embed_dim, out_features=embed_dim)
        self.aggregate = Conv2d_BN(embed_dim * (num_path + 1), out_embed_dim, act_layer=nn.Hardswish)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        att_outputs = [self.InvRes(inputs[0])]  # local path consumes the FIRST patch-embed output
        for x, encoder in zip(inputs, self.mhca_blks, strict=True):
            _, _, H, W = x.shape
            tokens = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
            att_outputs.append(encoder(tokens, size=(H, W)))  # [B, C, H, W]
        out_concat = torch.cat(att_outputs, dim=1)  # [B, (P+1)*C, H, W]
        return self.aggregate(out_concat)  # [B, C_out, H, W]


class Cls_head(nn.Module):  # noqa: N801 - official class name
    """Classification head: global average pool -> Linear (no final norm)."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.cls = nn.Linear(embed_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)  # [B, C]
        return self.cls(x)  # [B, num_classes]


def dpr_generator(drop_path_rate: float, num_layers: Sequence[int], num_stages: int) -> list[list[float]]:
    """Linear drop-path ramp over sum(num_layers) blocks, split per stage (each path of a stage gets the same list)."""
    dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(num_layers), device="cpu")]
    dpr_per_stage: list[list[float]] = []
    cur = 0
    for i in range(num_stages):
        dpr_per_stage.append(dpr[cur : cur + num_layers[i]])
        cur += num_layers[i]
    return dpr_per_stage


class MPViT(nn.Module):
    """Multi-Path Vision Transformer (Lee et al., CVPR 2022), official ``mpvit.py`` layout.

    stem (two stride-2 3x3 Conv2d_BN + Hardswish) -> 4 x (Patch_Embed_stage -> MHCA_stage) -> Cls_head.
    """

    def __init__(
        self,
        img_size: int = 224,
        num_stages: int = 4,
        num_path: Sequence[int] = (4, 4, 4, 4),
        num_layers: Sequence[int] = (1, 1, 1, 1),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        num_heads: Sequence[int] = (8, 8, 8, 8),
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        crpe_window: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_stages = num_stages
        dpr = dpr_generator(drop_path_rate, num_layers, num_stages)

        self.stem = nn.Sequential(
            Conv2d_BN(in_chans, embed_dims[0] // 2, kernel_size=3, stride=2, pad=1, act_layer=nn.Hardswish),
            Conv2d_BN(embed_dims[0] // 2, embed_dims[0], kernel_size=3, stride=2, pad=1, act_layer=nn.Hardswish),
        )
        self.patch_embed_stages = nn.ModuleList(
            [Patch_Embed_stage(embed_dims[idx], num_path=num_path[idx], isPool=idx != 0) for idx in range(num_stages)]
        )
        self.mhca_stages = nn.ModuleList(
            [
                MHCA_stage(
                    embed_dims[idx],
                    embed_dims[idx + 1] if idx + 1 != num_stages else embed_dims[idx],
                    num_layers[idx],
                    num_heads[idx],
                    mlp_ratios[idx],
                    num_path[idx],
                    drop_path_list=dpr[idx],
                    crpe_window=crpe_window,
                )
                for idx in range(num_stages)
            ]
        )
        self.cls_head = Cls_head(embed_dims[-1], num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)  # absolute bounds [-2, 2], as timm
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0.0)
            nn.init.constant_(m.weight, 1.0)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Return the four stage outputs (after each ``aggregate``), strides 4, 8, 16, 32."""
        x = self.stem(x)  # [B, C0, H/4, W/4]
        outs: list[Tensor] = []
        for idx in range(self.num_stages):
            att_inputs = self.patch_embed_stages[idx](x)  # num_path x [B, C_i, H_i, W_i]
            x = self.mhca_stages[idx](att_inputs)  # [B, C_{i+1}, H_i, W_i]
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)[-1]  # [B, C3, H/32, W/32]
        return self.cls_head(x)  # [B, num_classes]


def _mpvit(
    num_layers: Sequence[int], embed_dims: Sequence[int], mlp_ratio: float, num_classes: int = 1000, **kwargs: object
) -> MPViT:
    return MPViT(
        img_size=224,
        num_stages=4,
        num_path=[2, 3, 3, 3],
        num_layers=list(num_layers),
        embed_dims=list(embed_dims),
        mlp_ratios=[mlp_ratio] * 4,
        num_heads=[8, 8, 8, 8],
        num_classes=num_classes,
        **kwargs,  # type: ignore[arg-type]
    )


def mpvit_tiny(**kwargs: object) -> MPViT:
    """mpvit_tiny: 5,843,736 params (official docstring)."""
    return _mpvit([1, 2, 4, 1], [64, 96, 176, 216], 2, **kwargs)


def mpvit_xsmall(**kwargs: object) -> MPViT:
    """mpvit_xsmall: 10,573,448 params (official docstring)."""
    return _mpvit([1, 2, 4, 1], [64, 128, 192, 256], 4, **kwargs)


def mpvit_small(**kwargs: object) -> MPViT:
    """mpvit_small: 22,892,400 params (official docstring)."""
    return _mpvit([1, 3, 6, 3], [64, 128, 216, 288], 4, **kwargs)


def mpvit_base(**kwargs: object) -> MPViT:
    """mpvit_base: 74,845,976 params (official docstring)."""
    return _mpvit([1, 3, 8, 3], [128, 224, 368, 480], 4, **kwargs)
