"""Parameter counts of the standard layers, in plain integers (no torch): each block's ``params`` rule adds these
up so that budgets, ``validate`` and summaries know a model's size before any tensor exists. Every rule is tested
equal to the parameter count of the module it describes."""

from __future__ import annotations


def linear(fan_in: int, fan_out: int, bias: bool = True) -> int:
    """``nn.Linear(fan_in, fan_out, bias)``."""
    return fan_in * fan_out + (fan_out if bias else 0)


def conv(fan_in: int, fan_out: int, kernel: int | tuple[int, ...], groups: int = 1, bias: bool = True) -> int:
    """``nn.Conv{1,2}d(fan_in, fan_out, kernel, groups=groups, bias=bias)`` (a square kernel when an int)."""
    area = kernel * kernel if isinstance(kernel, int) else _product(kernel)
    return fan_in // groups * fan_out * area + (fan_out if bias else 0)


def norm(channels: int, affine: bool = True) -> int:
    """LayerNorm, GroupNorm or BatchNorm over ``channels`` (weight and bias; running statistics are buffers)."""
    return 2 * channels if affine else 0


def rms_norm(channels: int, affine: bool = True) -> int:
    """RMSNorm over ``channels`` (a weight, no bias)."""
    return channels if affine else 0


def conv_bn(fan_in: int, fan_out: int, kernel: int = 1, groups: int = 1) -> int:
    """A conv without bias followed by a BatchNorm (``ConvBn``)."""
    return conv(fan_in, fan_out, kernel, groups, bias=False) + norm(fan_out)


def inverted_residual(dim: int, hidden: int, dim_out: int) -> int:
    """1x1 Conv-BN (dim → hidden), 3x3 depthwise Conv-BN, 1x1 Conv-BN (hidden → dim_out): MobileNetV2's block and
    MPViT's local path alike."""
    return conv_bn(dim, hidden) + conv_bn(hidden, hidden, 3, hidden) + conv_bn(hidden, dim_out)


def mlp(dim: int, hidden: int, dim_out: int | None = None, bias: bool = True) -> int:
    """timm's two-layer ``Mlp``: ``fc1`` (dim → hidden), ``fc2`` (hidden → dim_out)."""
    return linear(dim, hidden, bias) + linear(hidden, dim_out or dim, bias)


def attention(dim: int, qkv_bias: bool = True, *, sr_kernel: int | None = None, head_norm: int | None = None) -> int:
    """timm's ``Attention`` layout: ``qkv`` (dim → 3 dim) and ``proj`` (dim → dim, with bias); PVT-v2's ``q`` and
    ``kv`` count as ``qkv``. ``sr_kernel``: keys and values reduced by ``sr`` (a conv dim → dim, with bias) and
    ``norm``; ``head_norm``: ``q_norm`` and ``k_norm`` over that many channels (a head's)."""
    total = linear(dim, 3 * dim, qkv_bias) + linear(dim, dim)
    if sr_kernel is not None:
        total += conv(dim, dim, sr_kernel) + norm(dim)
    if head_norm is not None:
        total += 2 * norm(head_norm)
    return total


def transformer_block(dim: int, hidden: int, qkv_bias: bool = True) -> int:
    """A pre-norm transformer block: ``norm1``, ``attn``, ``norm2``, ``mlp`` (ViT, CoaT's serial block, Swin)."""
    return 2 * norm(dim) + attention(dim, qkv_bias) + mlp(dim, hidden)


def _product(values: tuple[int, ...]) -> int:
    out = 1
    for v in values:
        out *= v
    return out
