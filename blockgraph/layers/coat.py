"""CoaT's conv-attentional layers (Xu et al., "Co-Scale Conv-Attentional Image Transformers", ICCV 2021), in
timm's layout: the convolutional position encoding (CPE) and relative position encoding (CRPE), the factorized
attention, the serial and parallel blocks, and the aggregating head. Tokens may carry extra (cls) tokens in front;
CPE and CRPE leave them unchanged / add nothing there, as in the paper."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockgraph.layers.common import DropPath, leading, linear, qkv_heads, residual_branch
from blockgraph.layers.heads import classifier
from blockgraph.layers.mlp import Mlp
from blockgraph.ops.coat import conv_pos_enc, crpe_conv, factor_attention, factor_attention_crpe
from blockgraph.ops.conv import merge_depthwise
from blockgraph.ops.kernel import eager_training, symbolic_tracing
from blockgraph.ops.linear import linear as linear_op


class ConvPosEnc(nn.Module):
    """``x + proj(x)`` at the image tokens: ``proj`` is a depthwise conv with bias, 'same' padding
    (:func:`blockgraph.ops.coat.conv_pos_enc`)."""

    def __init__(self, dim: int, kernel: int = 3, device: Any = None, dtype: Any = None):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel, 1, kernel // 2, groups=dim, device=device, dtype=dtype)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return conv_pos_enc(x, size, self.proj.weight, self.proj.bias)


class ConvRelPosEnc(nn.Module):
    """``conv_list``: one depthwise conv (with bias) per window, over its heads' channels (``dim // heads`` each;
    ``windows`` maps kernel size → heads, in head order). They run as one conv whose kernels are zero-padded to the largest
    (:func:`blockgraph.ops.conv.merge_depthwise`), so the window sizes must be odd."""

    def __init__(self, dim: int, heads: int, windows: dict[int, int], device: Any = None, dtype: Any = None):
        super().__init__()
        if any(k % 2 == 0 for k in windows):
            raise ValueError(f"CRPE windows must be odd (the map keeps its size), got {sorted(windows)}")
        self.heads = heads
        head_dim = dim // heads
        self.conv_list = nn.ModuleList(
            nn.Conv2d(n * head_dim, n * head_dim, k, padding=k // 2, groups=n * head_dim, device=device, dtype=dtype)
            for k, n in windows.items()
        )

    def forward(self, v: Tensor, size: tuple[int, int]) -> Tensor:
        """The windows' convolution of the image tokens' values ``v`` ``[B, H*W, h, Ch]`` (channel = head * Ch + c),
        in the same layout; the attention multiplies it by q (:func:`blockgraph.ops.coat.factor_attention`)."""
        B, L, h, Ch = v.shape
        if torch.jit.is_scripting():  # (merge_depthwise takes the modules: TorchScript's runs each convolution)
            img = v.reshape(B, size[0], size[1], h * Ch).permute(0, 3, 1, 2)
            outs: list[Tensor] = []
            start = 0
            for layer in self.conv_list:
                n = layer.weight.shape[0]
                outs.append(layer(img[:, start : start + n]))
                start += n
            return torch.cat(outs, dim=1).permute(0, 2, 3, 1).reshape(B, L, h, Ch)
        weight, bias = merge_depthwise(self.conv_list)  # (a ModuleList of Conv2d)
        return crpe_conv(v, size, weight, bias)


class FactorAttnConvRelPosEnc(nn.Module):
    """``qkv`` → factorized attention ``Ch^-0.5 * q (softmax_N(k)^T v)`` + ``q * crpe(v)`` → ``proj``, then drop
    path and a residual add when given one."""

    def __init__(
        self, dim: int, heads: int = 8, qkv_bias: bool = True, proj_drop: float = 0.0, drop_path: float = 0.0,
        device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: Tensor,
        size: tuple[int, int],
        crpe: ConvRelPosEnc,
        residual: Tensor | None = None,
        queries: int | None = None,
    ) -> Tensor:
        """``residual + drop_path(attention(x))``. ``queries``: only the first ``queries`` tokens attend (every
        token is a key and a value), and only they are returned."""
        if queries is None and eager_training(x):  # every token attends: one node (ops.coat.factor_attention_crpe)
            B, N, C = x.shape
            qkv = linear_op(x, self.qkv.weight, self.qkv.bias).view(B, N, 3, self.heads, C // self.heads)
            weight, bias = merge_depthwise(crpe.conv_list)
            y = factor_attention_crpe(qkv, self.scale, size, weight, bias)
            return residual_branch(self.proj, y, residual, self.proj_drop, self.drop_path)
        q, k, v = qkv_heads(x, self.qkv.weight, self.qkv.bias, self.heads, queries)  # [B, Nq, h, Ch], [B, N, h, Ch] x2
        extra = x.shape[1] - size[0] * size[1]  # the CRPE adds nothing at extra (cls) tokens
        image_queries = queries is None if symbolic_tracing() else q.shape[1] > extra  # (a trace: no sizes)
        conv_v = crpe(v[:, extra:], size) if image_queries else None
        y = factor_attention(q, k, v, self.scale, conv_v)  # [B, Nq, C]
        return residual_branch(self.proj, y, residual, self.proj_drop, self.drop_path)

    def script_forward(
        self, x: Tensor, size: tuple[int, int], residual: Tensor | None = None, queries: int | None = None
    ) -> Tensor:
        """TorchScript's: the CRPE is the attribute ``crpe`` the script view attaches (compiler/script.py)."""
        q, k, v = qkv_heads(x, self.qkv.weight, self.qkv.bias, self.heads, queries)
        extra = x.shape[1] - size[0] * size[1]
        conv_v = self.crpe(v[:, extra:], size) if q.shape[1] > extra else None
        y = self.drop_path(self.proj_drop(self.proj(factor_attention(q, k, v, self.scale, conv_v))))
        return y if residual is None else residual + y


class SerialBlock(nn.Module):
    """CoaT's serial block: ``x = cpe(x)``, ``x + DropPath(FA(LN1(x)))``, ``x + DropPath(MLP(LN2(x)))``, with
    ``norm1``, ``factoratt_crpe``, ``norm2``, ``mlp`` (timm's names); CPE and CRPE are passed in. With ``keep``, only
    the first ``keep`` tokens (extra tokens) are computed and returned; every token is a key and a value."""

    def __init__(
        self, dim: int, heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
        proj_drop: float = 0.0, norm_eps: float = 1e-6, act: str = "gelu", keep: int | None = None,
        device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.keep = keep
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.factoratt_crpe = FactorAttnConvRelPosEnc(dim, heads, qkv_bias, proj_drop, drop_path, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, mlp_ratio, act=act, drop=proj_drop, drop_path=drop_path, **dd)

    def forward(
        self, x: Tensor, size: tuple[int, int], cpe: ConvPosEnc, crpe: ConvRelPosEnc, full: bool = False
    ) -> Tensor:
        keep = None if full else self.keep  # full: every token, for a reader other than the trimmed model's
        x = cpe(x, size)
        x = self.factoratt_crpe(self.norm1(x), size, crpe, residual=leading(x, keep), queries=keep)
        return self.mlp(self.norm2(x), residual=x)

    def script_attach(self, cpe: ConvPosEnc, crpe: ConvRelPosEnc) -> None:
        """Where the script view (compiler/script.py) puts the shared modules: CPE here, CRPE in the attention."""
        self._modules["cpe"] = cpe
        self.factoratt_crpe._modules["crpe"] = crpe

    def script_forward(self, x: Tensor, size: tuple[int, int], full: bool = False) -> Tensor:
        """TorchScript's: CPE and the attention's CRPE are attributes (:meth:`script_attach`)."""
        keep = None if full else self.keep
        x = self.cpe(x, size)
        x = self.factoratt_crpe(self.norm1(x), size, residual=leading(x, keep), queries=keep)
        return self.mlp(self.norm2(x), residual=x)


class ParallelBlock(nn.Module):
    """CoaT's parallel block: per scale ``p``, ``norm1[p]``, ``attn[p]`` (FactorAttnConvRelPosEnc with the scale's
    CPE and CRPE), ``norm2[p]``; each scale adds every other scale's attention output resized to its grid
    (bilinear; by the scale ``factors`` timm uses, or to the target grid); one ``mlp`` for all scales."""

    def __init__(
        self, dim: int, ports: list[str], heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = True,
        drop_path: float = 0.0, proj_drop: float = 0.0, norm_eps: float = 1e-6, act: str = "gelu",
        factors: list[list[float | None]] | None = None, extra: int = 1, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.ports = list(ports)
        self.extra = extra
        self.factors = factors
        n = len(ports)
        # Sources added to each scale: nearest first, coarser first among equals (timm's order of additions).
        self.sources = [sorted((j for j in range(n) if j != i), key=lambda j, i=i: (abs(j - i), -j)) for i in range(n)]
        # TorchScript's view of `factors`: -1.0 for "to the target grid" (it types no list mixing None and floats)
        self.script_factors = [[-1.0 if f is None else float(f) for f in row] for row in factors or [[None] * n] * n]
        self.norm1 = nn.ModuleDict({p: nn.LayerNorm(dim, eps=norm_eps, **dd) for p in ports})
        self.attn = nn.ModuleDict({p: FactorAttnConvRelPosEnc(dim, heads, qkv_bias, proj_drop, **dd) for p in ports})
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.ModuleDict({p: nn.LayerNorm(dim, eps=norm_eps, **dd) for p in ports})
        self.mlp = Mlp(dim, mlp_ratio, act=act, drop=proj_drop, drop_path=drop_path, **dd)

    def _resize(self, x: Tensor, size: tuple[int, int], target: tuple[int, int], factor: float | None) -> Tensor:
        B, N, C = x.shape
        img = x[:, self.extra :].transpose(1, 2).reshape(B, C, size[0], size[1])  # [B, C, H, W]
        if factor is not None:
            img = F.interpolate(img, scale_factor=factor, recompute_scale_factor=False, mode="bilinear",
                                align_corners=False)  # fmt: skip
        else:
            img = F.interpolate(img, size=target, mode="bilinear", align_corners=False)
        img = img.reshape(B, C, -1).transpose(1, 2)  # [B, h*w, C]
        return torch.cat((x[:, : self.extra], img), dim=1) if self.extra else img

    def forward(self, *args: Any, cpes: tuple[ConvPosEnc, ...], crpes: tuple[ConvRelPosEnc, ...]) -> tuple:
        n = len(self.ports)
        xs, sizes = list(args[:n]), args[n:]
        xs = [cpe(x, size) for cpe, x, size in zip(cpes, xs, sizes, strict=True)]
        cur = [
            self.attn[p](self.norm1[p](x), size, crpe)
            for p, x, size, crpe in zip(self.ports, xs, sizes, crpes, strict=True)
        ]
        outs = []
        for i, (p, x) in enumerate(zip(self.ports, xs, strict=True)):
            mixed = cur[i]
            for j in self.sources[i]:
                factor = self.factors[i][j] if self.factors is not None else None
                mixed = mixed + self._resize(cur[j], sizes[j], sizes[i], factor)
            x = x + self.drop_path(mixed)
            outs.append(self.mlp(self.norm2[p](x), residual=x))
        return tuple(outs)

    script_packs_inputs = True

    def script_attach(self, cpes: nn.ModuleList, crpes: nn.ModuleList) -> None:
        """Where the script view (compiler/script.py) puts the shared modules: the CPEs here, each CRPE in its
        scale's attention."""
        self._modules["cpes"] = cpes
        for attn, crpe in zip(self.attn.values(), crpes, strict=True):
            attn._modules["crpe"] = crpe

    def script_forward(self, xs: list[Tensor], sizes: list[tuple[int, int]]) -> list[Tensor]:
        """TorchScript's: the inputs and their grids as lists, the shared modules attributes (:meth:`script_attach`)."""
        i = 0
        for cpe in self.cpes:
            xs[i] = cpe(xs[i], sizes[i])
            i += 1
        cur: list[Tensor] = []
        i = 0
        for norm in self.norm1.values():
            cur.append(norm(xs[i]))
            i += 1
        i = 0
        for attn in self.attn.values():
            cur[i] = attn(cur[i], sizes[i])
            i += 1
        outs: list[Tensor] = []
        i = 0
        for norm in self.norm2.values():
            mixed = cur[i]
            for j in self.sources[i]:
                factor = self.script_factors[i][j]
                mixed = mixed + self._resize(cur[j], sizes[j], sizes[i], None if factor < 0 else factor)
            x = xs[i] + self.drop_path(mixed)
            outs.append(self.mlp(norm(x), residual=x))
            i += 1
        return outs


class AggregateHead(nn.Module):
    """``norms[k]`` per scale → pool (cls tokens, or token means) → ``aggregate`` (Conv1d(n, 1, 1)) → ``drop`` →
    ``fc`` (skipped with ``pre_logits``)."""

    def __init__(
        self, dim: int, n: int, num_classes: int, pool: str = "token", extra: int = 1, norm_eps: float = 1e-6,
        drop: float = 0.0, device: Any = None, dtype: Any = None,
    ):  # fmt: skip
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.pool = pool
        self.extra = extra
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=norm_eps, **dd) for _ in range(n))
        self.aggregate = nn.Conv1d(n, 1, kernel_size=1, **dd)
        self.drop = nn.Dropout(drop)
        self.fc = classifier(dim, num_classes, **dd)

    def forward(self, *xs: Tensor, pre_logits: bool = False) -> Tensor:
        if self.pool == "token":
            pooled = [norm(x)[:, 0] for norm, x in zip(self.norms, xs, strict=True)]
        else:
            pooled = [norm(x)[:, self.extra :].mean(dim=1) for norm, x in zip(self.norms, xs, strict=True)]
        x = self.drop(self.aggregate(torch.stack(pooled, dim=1)).squeeze(1))  # [B, n, C] -> [B, C]
        return x if pre_logits else self.fc(x)

    script_packs_inputs = True

    def script_forward(self, xs: list[Tensor], pre_logits: bool = False) -> Tensor:
        """TorchScript's: the scales' tokens as one list."""
        pooled: list[Tensor] = []
        i = 0
        for norm in self.norms:
            pooled.append(norm(xs[i])[:, 0] if self.pool == "token" else norm(xs[i])[:, self.extra :].mean(dim=1))
            i += 1
        x = self.drop(self.aggregate(torch.stack(pooled, dim=1)).squeeze(1))
        return x if pre_logits else self.fc(x)
