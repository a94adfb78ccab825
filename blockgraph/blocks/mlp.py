"""The transformer MLP: fc1 → activation → dropout → fc2 → dropout (timm's ``Mlp`` layout)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import Activation, BuildContext, Rate
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType


@register
class MlpSpec(BlockSpec):
    """Two-layer MLP over the channels of tokens (or of a vector) (Vaswani et al., 2017)."""

    op: Literal["mlp"]
    dim: PositiveInt
    """Input channels."""
    mlp_ratio: PositiveFloat = 4.0
    """Hidden width = int(dim * mlp_ratio)."""
    dim_out: PositiveInt | None = None
    """Output channels (default: dim)."""
    act: Activation = "gelu"
    """Activation function."""
    drop: Rate = 0.0
    """Dropout after each layer (training only)."""

    def infer(self, ctx: InferContext, x: TensorType) -> TensorType:
        ctx.expect(x, layout=("tokens", "vector"), channels=self.dim)
        return x.with_(channels=self.dim_out or self.dim)

    def build(self, ctx: BuildContext, x: TensorType) -> Any:
        from blockgraph.layers.mlp import Mlp

        return Mlp(**self.fields(), **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.mlp(self.dim, int(self.dim * self.mlp_ratio), self.dim_out)
