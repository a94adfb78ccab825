"""What a block's ``build`` receives, and the fields several blocks share (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt

from blockgraph.spec.schema import BlockSpec

if TYPE_CHECKING:
    from blockgraph.graph.infer import InferContext
    from blockgraph.types import Expr

Rate = Annotated[float, Field(ge=0.0, lt=1.0)]
"""A dropout-like probability in [0, 1) (dropout, drop path)."""
Activation = Literal["gelu", "relu", "silu", "hardswish"]
"""The activations of transformer MLPs."""


@dataclass(frozen=True)
class BuildContext:
    """Where and how a block's module is built: ``device``/``dtype`` go to every parameter (``meta`` works)."""

    node: str
    device: Any = None
    dtype: Any = None
    keep_tokens: int | None = None
    """For a block that ``trims_tokens``: return only this many leading tokens (None: all); see
    :attr:`~blockgraph.spec.schema.BlockSpec.trims_tokens`."""
    input_size: tuple[int, int] | None = None
    """The spec's input ``(H, W)``: a block may precompute what depends on it (a mask); the model takes other
    sizes too."""

    def at_input_size(self, size: Expr) -> int | None:
        """A size expression (of the symbols ``H``, ``W``) at :attr:`input_size`; None without one."""
        if self.input_size is None:
            return None
        return size.evaluate({"H": self.input_size[0], "W": self.input_size[1]})

    @property
    def dd(self) -> dict[str, Any]:
        """``{"device": ..., "dtype": ...}`` for layer constructors, timm style."""
        return {"device": self.device, "dtype": self.dtype}


class AttentionFields(BlockSpec):
    """The fields of a multi-head attention over ``dim`` channels (not an op itself)."""

    dim: PositiveInt
    """Channels of the input (and of the output)."""
    heads: PositiveInt
    """Attention heads; they must divide `dim`."""
    qkv_bias: bool = True
    """Bias on the q, k, v projection."""
    proj_drop: Rate = 0.0
    """Dropout after the output projection and in the MLP (training only)."""

    def check_heads(self, ctx: InferContext) -> None:
        ctx.divides(self.dim, self.heads, field="heads", what="head")


class TransformerFields(AttentionFields):
    """The fields of a pre-norm transformer block: attention, then an MLP, each a residual branch (not an op)."""

    mlp_ratio: PositiveFloat = 4.0
    """MLP hidden width = int(dim * mlp_ratio)."""
    drop_path: Rate = 0.0
    """Stochastic-depth rate of the residual branches (0: off)."""
    norm_eps: PositiveFloat = 1e-6
    """LayerNorm epsilon."""
    act: Activation = "gelu"
    """Activation function."""
