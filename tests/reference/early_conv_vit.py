"""An independent plain-PyTorch early-convolution ViT (Xiao et al., "Early Convolutions Help Transformers See Better",
NeurIPS 2021): a stem of stride-2 3x3 Conv-BN-ReLU layers and a 1x1 conv in place of the 16x16 patchify, then a
ViT encoder (cls token, learned position embedding, pre-norm blocks) and a linear head on the cls token.

Written from the paper, with no code from blockgraph or timm: the reference for specs/vit_small_early_conv.yaml,
which has no timm twin. Attention is spelled out (q k^T / sqrt(d), softmax, v) rather than fused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, N, d]
        weights = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(dim=-1)  # [B, h, N, N]
        return self.proj((weights @ v).transpose(1, 2).reshape(B, N, C))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class EarlyConvViT(nn.Module):
    def __init__(
        self,
        stem: tuple[int, ...] = (48, 96, 192, 384),
        dim: int = 384,
        depth: int = 11,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        grid: int = 14,
        num_classes: int = 1000,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for out in stem:
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        layers.append(nn.Conv2d(width, dim, 1))
        self.stem = nn.Sequential(*layers)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        self.encoder = nn.Sequential(*(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, image: Tensor) -> Tensor:
        x = self.stem(image).flatten(2).transpose(1, 2)  # [B, h*w, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        x = self.encoder(x)
        return self.classifier(self.ln(x[:, 0]))


def ours_to_reference(key: str) -> str:
    """A key of the blockgraph model → the same tensor's key here."""
    import re

    rules = [
        (r"^stem\.conv(\d)\.conv\.", lambda m: f"stem.{3 * int(m[1])}."),
        (r"^stem\.conv(\d)\.bn\.", lambda m: f"stem.{3 * int(m[1]) + 1}."),
        (r"^stem\.proj\.", lambda m: "stem.12."),
        (r"^cls\.token$", lambda m: "cls_token"),
        (r"^pos\.weight$", lambda m: "position"),
        (r"^blocks\.(\d+)\.norm1\.", lambda m: f"encoder.{m[1]}.ln1."),
        (r"^blocks\.(\d+)\.norm2\.", lambda m: f"encoder.{m[1]}.ln2."),
        (r"^blocks\.(\d+)\.attn\.", lambda m: f"encoder.{m[1]}.attention."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", lambda m: f"encoder.{m[1]}.ffn.0."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", lambda m: f"encoder.{m[1]}.ffn.2."),
        (r"^head\.norm\.", lambda m: "ln."),
        (r"^head\.fc\.", lambda m: "classifier."),
    ]
    for pattern, to in rules:
        new, n = re.subn(pattern, to, key)
        if n:
            return new
    return key
