"""The block library: importing this package registers every built-in op (without importing torch)."""

from blockgraph.blocks import (  # noqa: F401  (registration)
    attention,
    coat,
    conv,
    deformable,
    einops,
    heads,
    mlp,
    mobilevit,
    mpvit,
    patch_embed,
    primitives,
    swin,
    tokens,
    vit,
)
from blockgraph.blocks.base import BuildContext

__all__ = ["BuildContext"]
