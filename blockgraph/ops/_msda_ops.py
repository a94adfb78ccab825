"""The fake kernels and the autograd formula shared by the kernel backends of
:func:`blockgraph.ops.ms_deform_attn` (the C++ ops, ``_cpp``, and the Triton ones, ``_msda_triton``), whose ops
share their signatures: ``forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)``
and ``backward(grad_out, <the same five>, need_value, need_loc, need_attn, *extra)`` → the three gradients, an empty
``[0]`` tensor for one not asked for."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def kernel_output_like(value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
    """The forward op's result, empty: ``[N, Lq, M*D]``."""
    N, _, M, D = value.shape
    return value.new_empty(N, loc.shape[1], M * D)


def kernel_grads_like(
    grad_out: Tensor,
    value: Tensor,
    shapes: Tensor,
    starts: Tensor,
    loc: Tensor,
    attn: Tensor,
    need_value: bool,
    need_loc: bool,
    need_attn: bool,
    *extra: object,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward op's results, empty: each gradient like its input (contiguous, its dtype), or ``[0]``."""

    def grad(like: Tensor, needed: bool) -> Tensor:
        return torch.empty_like(like, memory_format=torch.contiguous_format) if needed else like.new_empty(0)

    return grad(value, need_value), grad(loc, need_loc), grad(attn, need_attn)


def save_kernel_inputs(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)  # value, spatial_shapes, level_start_index, sampling_locations, attention_weights


def kernel_grads(ctx, grad_out: Tensor, backward: Callable[..., tuple[Tensor, ...]], *extra: object) -> tuple:
    """The forward op's gradients through its ``backward`` op (``extra``: that op's arguments after the flags)."""
    value, shapes, starts, loc, attn = ctx.saved_tensors
    need_value, _, _, need_loc, need_attn = ctx.needs_input_grad
    grad_value, grad_loc, grad_attn = backward(
        grad_out, value, shapes, starts, loc, attn, need_value, need_loc, need_attn, *extra
    )
    return (
        grad_value if need_value else None,
        None,
        None,
        grad_loc if need_loc else None,
        grad_attn if need_attn else None,
    )


def refuse_double_backward(backend: str, ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
    raise RuntimeError(f"ms_deform_attn ({backend} backend) supports first derivatives only; use backend='reference'")
