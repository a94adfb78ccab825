"""The modules of the einops ops: einops' own layers, and one that reads lengths from the token grid."""

from __future__ import annotations

from typing import Any

import einops
import torch
from einops._torch_specific import apply_for_scriptable_torch
from einops.einops import _prepare_recipes_for_all_dims
from einops.layers import torch as einops_layers
from torch import nn

from blockgraph.ops.kernel import symbolic_tracing

__all__ = ["EinopsOnGrid", "Rearrange", "Reduce"]


def einops_reduce(x: torch.Tensor, pattern: str, reduction: str, lengths: dict[str, int], grid: dict[str, Any]) -> Any:
    """``einops.reduce`` with the axis lengths: one call that ``torch.fx`` records as it is (einops takes no
    proxies), the grid's sizes as its arguments."""
    return einops.reduce(x, pattern, reduction, **lengths, **grid)


torch.fx.wrap("einops_reduce")


class EinopsOnGrid(nn.Module):
    """``einops.reduce(x, pattern, reduction, **lengths)`` (``reduction`` may be ``rearrange`` or ``repeat``, as in
    einops itself) where some lengths are the token grid ``(h, w)`` that ``forward`` receives: ``b (h w) c -> b c h
    w`` on tokens names ``h``, which einops cannot infer from the token count alone.

    Args:
        pattern: the einops pattern.
        reduction: ``rearrange``, ``repeat``, or a reduction (``mean``, ``max``, ...).
        lengths: constant axis lengths.
        grid_axes: axes whose length is the grid's: axis → 0 (rows, ``h``) or 1 (columns, ``w``).
    """

    def __init__(self, pattern: str, reduction: str, lengths: dict[str, int], grid_axes: dict[str, int]):
        super().__init__()
        self.pattern = pattern
        self.reduction = reduction
        self.lengths = dict(lengths)
        self.grid_axes = dict(grid_axes)
        # for TorchScript (script_forward): einops' parsed pattern per input rank, and the lengths as pairs
        names = (*self.lengths, *self.grid_axes)
        self._multirecipe = _prepare_recipes_for_all_dims(pattern, operation=reduction, axes_names=names)
        # (axis, length) pairs, a grid axis's length written as -1 - its index in the size (never empty: a grid axis)
        self._axes = [*self.lengths.items(), *((axis, -1 - i) for axis, i in self.grid_axes.items())]

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        grid = {axis: size[i] for axis, i in self.grid_axes.items()}
        return einops_reduce(x, self.pattern, self.reduction, self.lengths, grid)

    def script_forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """TorchScript's: einops' scriptable path (as its layers take), the grid's lengths given at run time."""
        axes = [(axis, n if n >= 0 else size[-1 - n]) for axis, n in self._axes]
        return apply_for_scriptable_torch(self._multirecipe[x.ndim], x, reduction_type=self.reduction, axes_dims=axes)

    def extra_repr(self) -> str:
        lengths = "".join(f", {axis}={length}" for axis, length in self.lengths.items())
        grid = "".join(f", {axis}=grid[{i}]" for axis, i in self.grid_axes.items())
        return f"{self.pattern!r}, {self.reduction!r}{lengths}{grid}"


class Rearrange(einops_layers.Rearrange):
    """einops' ``Rearrange`` layer, which ``torch.fx`` records as one call (einops' layers take no proxies)."""

    script_forward = einops_layers.Rearrange.forward  # TorchScript compiles einops' own (compiler/script.py)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if symbolic_tracing():
            return einops_reduce(input, self.pattern, "rearrange", self.axes_lengths, {})
        return super().forward(input)


class Reduce(einops_layers.Reduce):
    """einops' ``Reduce`` layer, which ``torch.fx`` records as one call (einops' layers take no proxies)."""

    script_forward = einops_layers.Reduce.forward  # TorchScript compiles einops' own (compiler/script.py)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if symbolic_tracing():
            return einops_reduce(input, self.pattern, self.reduction, self.axes_lengths, {})
        return super().forward(input)
