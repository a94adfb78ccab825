"""The block library: importing this package registers every built-in op (without importing torch)."""

from blockgraph.blocks import coat, conv, heads, mlp, mpvit, patch_embed, tokens, vit  # noqa: F401  (registration)
from blockgraph.blocks.base import BuildContext

__all__ = ["BuildContext"]
