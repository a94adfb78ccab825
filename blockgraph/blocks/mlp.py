"""The transformer MLP: fc1 → activation → dropout → fc2 → dropout (timm's ``Mlp`` layout)."""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveFloat, PositiveInt

from blockgraph.blocks import count
from blockgraph.blocks.base import BuildContext, Rate, activation, linear
from blockgraph.blocks.lazy import Module, fused, nn, torch
from blockgraph.graph.infer import InferContext
from blockgraph.spec.schema import BlockSpec, register
from blockgraph.types import TensorType

Activation = Literal["gelu", "relu", "silu", "hardswish"]


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

    def build(self, ctx: BuildContext, x: TensorType) -> Mlp:
        return Mlp(self.dim, int(self.dim * self.mlp_ratio), self.dim_out, self.act, self.drop, **ctx.dd)

    def params(self, x: TensorType) -> int:
        return count.mlp(self.dim, int(self.dim * self.mlp_ratio), self.dim_out)


class Mlp(Module):
    """``fc1`` → act → drop → ``fc2`` → drop, over the last dimension."""

    def __init__(self, dim, hidden, dim_out=None, act="gelu", drop=0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = linear(dim, hidden, **dd)
        self.act = activation(act)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = linear(hidden, dim_out or dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of ``x``, plus ``residual`` if given (callers pass it in eval mode only, where drop path is the
        identity; the fused kernels add it in fc2's epilogue)."""
        if fused.enabled(self):
            return fused.linear(fused.linear(x, self.fc1, self.act), self.fc2, residual=residual)
        y = self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
        return y if residual is None else residual + y
