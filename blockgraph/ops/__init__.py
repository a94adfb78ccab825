"""blockgraph.ops: tensor operations the blocks build on (pure functions, no parameters)."""

from blockgraph.ops.ms_deform_attn import exporting, ms_deform_attn, ms_deform_attn_backend, ms_deform_attn_reference

__all__ = ["exporting", "ms_deform_attn", "ms_deform_attn_backend", "ms_deform_attn_reference"]
