"""Triton kernels of :func:`blockgraph.ops.ms_deform_attn` (``backend="triton"``), as the ops
``torch.ops.blockgraph_msda_triton.forward`` / ``.backward`` with fake kernels and a registered autograd.

Imported on first use only (``import blockgraph`` never imports this module). The math is the C++ kernel's
(``csrc/ms_deform_attn.cpp``): one pass over the samples gathers the four bilinear corners of every (level, point)
from ``value`` in its native ``[N, S, M, D]`` layout, with the attention weight folded into the corner weights, and
the backward recomputes the corner geometry from the locations.

Work split: one program per (batch n, head m, block of ``BLOCK_Q`` queries), holding a ``[BLOCK_Q, BLOCK_D]`` tile
(all D channels of its queries; D padded to a power of two and masked). It loops over the levels and points; each
(level, point) loads the locations and weights of its queries, finds the corners (:func:`_corners`) and gathers
four ``[BLOCK_Q, D]`` tiles of ``value``, masked outside the map (zero padding). Nothing of size ``[.., L, P, 4,
D]`` exists.

Backward (:func:`_backward_kernel`, same split): the location and weight gradients are dot products
``<grad_out[n, q, m], value[corner]>``, each written once by the program that owns the sample. The value gradient
is a scatter, ``grad_value[corner] += a * w_c * grad_out[n, q, m]``, where many samples may hit one row. Two ways:

- by default, ``tl.atomic_add`` (relaxed) into a buffer in the compute dtype: fast, but on a GPU the order of the
  additions, hence the rounding, varies from run to run;
- deterministic, when ``torch.are_deterministic_algorithms_enabled()`` (torch's switch, which its own scatter ops
  obey): the kernel writes, for every (sample, corner), the table row it hits (row ``(n*S + s)*M + m`` of value
  viewed as ``[N*S*M, D]``; a row past the end outside the map) and its weight ``a * w_c``. A *stable* sort of the
  rows lists, for every row, the (sample, corner) pairs that hit it in one fixed order (sample order), and
  :func:`_sum_rows_kernel` (one program per row) sums ``weight * grad_out[sample]`` over its list sequentially.
  No atomics: each sum is taken in the same order on every run. The cost: a (row, weight) pair per (sample, corner)
  and their sort, about 20 bytes per pair in float32 whatever D, during the backward only (0.8 GB at the DINO
  encoder's shape with batch 8), and a second kernel.

Precision: the kernels take each of value, sampling_locations and attention_weights in its own floating dtype
(float32, float64, bfloat16, float16) and compute in float32 (float64 when any input is float64), as the other
backends do after upcasting reduced precision to float32, but without the float32 copies of ``value`` (the largest
input) and of the output. Results are stored in each input's dtype; the value gradient is accumulated in the
compute dtype and rounded once at the end.

Pixel coordinates are rounded as grid_sample rounds them: ``fma(2 * loc - 1 + 1, size / 2, -0.5)``, one rounding,
which equals both the CPU grid_sample's vectorized fma and the CUDA one's ``((g + 1) * size - 1) / 2`` when its
multiply-add is fused (halving is exact), so floor() agrees with the reference at pixel centres, where the
derivative w.r.t. the location is one-sided.

Interpreter: with ``TRITON_INTERPRET=1`` in the environment when triton is *imported* (torch imports it with
``torch._dynamo``, so in practice before Python starts), Triton decorates its own library (``tl.sum``, ...) for
its interpreter, which runs kernels in numpy on CPU tensors (CUDA tensors are copied to the host and back): how the
tests run without a GPU. The kernels here follow the mode triton's library was decorated in (:data:`INTERPRETED`),
whatever the variable says by the time this module is imported, so the two always agree.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from blockgraph.ops._msda_ops import (
    kernel_grads,
    kernel_grads_like,
    kernel_output_like,
    refuse_double_backward,
    save_kernel_inputs,
)

__all__ = ["INTERPRETED", "ms_deform_attn", "unusable"]

INTERPRETED = not isinstance(tl.sum, triton.runtime.JITFunction)
"""Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""

# ``@triton.jit`` as Triton's own library got it: a kernel's helpers (``tl.sum``, ours) must be of its kind. (The
# interpreter's module imports numpy, which the compiled kernels do not need.)
if INTERPRETED:
    from triton.runtime.interpreter import InterpretedFunction

    _jit = InterpretedFunction
else:
    _jit = triton.jit

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}

# What the backward kernel does for the value gradient (its GRAD_VALUE switch).
_NO_GRAD_VALUE, _ATOMIC, _ENTRIES = 0, 1, 2


def unusable(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device``, or None when they can (meta tensors: the fake kernels)."""
    if device.type in ("cuda", "meta") or (device.type == "cpu" and INTERPRETED):
        return None
    if device.type == "cpu":
        return (
            "on CPU tensors they run in Triton's interpreter only, and triton was imported without TRITON_INTERPRET=1"
        )
    return f"they run on CUDA tensors (or in Triton's interpreter), not on {device.type}"


def ms_deform_attn(value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
    """The Triton path of :func:`blockgraph.ops.ms_deform_attn` (checked arguments; dtypes may differ)."""
    return torch.ops.blockgraph_msda_triton.forward(value, shapes, starts, loc, attn)


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@_jit
def _queries(Lq, M, BLOCK_Q: tl.constexpr):
    """This program's batch n, head m and block of queries q (mask in_q), and ``bag``: the row (n, q, m) of
    out / grad_out viewed as ``[N*Lq*M, D]``."""
    pid = tl.program_id(0)
    blocks = (Lq + BLOCK_Q - 1) // BLOCK_Q
    head = pid // blocks  # n * M + m
    n = (head // M).to(tl.int64)
    m = head % M
    q = (pid % blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BLOCK_Q]
    return n, m, q < Lq, (n * Lq + q) * M + m


@_jit
def _corners(loc_ptr, s, in_q, H, W, start, S, COMPUTE: tl.constexpr):
    """The bilinear corners of the samples ``s`` ([BLOCK_Q] indices) on the H x W level whose pixel 0 is row
    ``start`` of value: the fractional parts (fx, fy), the value row r00 of corner (y0, x0), and k00..k11, whether
    corner c = (y0 + c // 2, x0 + c % 2) lies in the map (all False where no corner does, or for NaN)."""
    x = tl.load(loc_ptr + 2 * s, mask=in_q, other=0).to(COMPUTE)
    y = tl.load(loc_ptr + 2 * s + 1, mask=in_q, other=0).to(COMPUTE)
    Wf = W.to(COMPUTE)
    Hf = H.to(COMPUTE)
    zero = tl.zeros_like(x)
    # Pixel coordinates, rounded as grid_sample rounds them (see the module docstring).
    px = tl.fma(x * 2 - 1 + 1, zero + Wf * 0.5, zero - 0.5)
    py = tl.fma(y * 2 - 1 + 1, zero + Hf * 0.5, zero - 0.5)
    ok = in_q & (px >= -1) & (px < Wf) & (py >= -1) & (py < Hf)  # some corner inside
    px = tl.where(ok, px, 0.0)
    py = tl.where(ok, py, 0.0)
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    x0 = x0f.to(tl.int64)
    y0 = y0f.to(tl.int64)
    r00 = start + y0 * W + x0
    in_x0 = x0 >= 0
    in_x1 = x0 + 1 < W
    in_y0 = ok & (y0 >= 0)
    in_y1 = ok & (y0 + 1 < H)
    k00 = in_y0 & in_x0 & (r00 < S)  # (r < S: a level that does not fit in value reads nothing)
    k01 = in_y0 & in_x1 & (r00 + 1 < S)
    k10 = in_y1 & in_x0 & (r00 + W < S)
    k11 = in_y1 & in_x1 & (r00 + W + 1 < S)
    return px - x0f, py - y0f, r00, k00, k01, k10, k11


@_jit
def _tile(value_ptr, offset, inside, d, in_d, COMPUTE: tl.constexpr):
    """value's D channels at element offsets ``offset`` [BLOCK_Q], zeros where not ``inside``: [BLOCK_Q, BLOCK_D]."""
    tile = tl.load(value_ptr + offset[:, None] + d[None, :], mask=inside[:, None] & in_d[None, :], other=0)
    return tile.to(COMPUTE)


@_jit
def _forward_kernel(
    value_ptr,  # [N, S, M, D]
    shapes_ptr,  # [L, 2] int64 (H, W)
    starts_ptr,  # [L] int64
    loc_ptr,  # [N, Lq, M, L, P, 2]
    attn_ptr,  # [N, Lq, M, L, P]
    out_ptr,  # [N, Lq, M, D]
    S,
    Lq,
    M,
    D,
    L,
    P,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    n, m, in_q, bag = _queries(Lq, M, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=COMPUTE)
    for lv in range(L):
        H = tl.load(shapes_ptr + 2 * lv)
        W = tl.load(shapes_ptr + 2 * lv + 1)
        start = tl.load(starts_ptr + lv)
        for p in range(P):
            s = (bag * L + lv) * P + p  # [BLOCK_Q] sample index
            a = tl.load(attn_ptr + s, mask=in_q, other=0).to(COMPUTE)
            fx, fy, r00, k00, k01, k10, k11 = _corners(loc_ptr, s, in_q, H, W, start, S, COMPUTE)
            t00 = ((n * S + r00) * M + m) * D  # [BLOCK_Q] element offset of corner (y0, x0)
            t01 = t00 + M * D
            t10 = t00 + W * M * D
            t11 = t10 + M * D
            acc += tl.where(k00, a * (1 - fy) * (1 - fx), 0.0)[:, None] * _tile(value_ptr, t00, k00, d, in_d, COMPUTE)
            acc += tl.where(k01, a * (1 - fy) * fx, 0.0)[:, None] * _tile(value_ptr, t01, k01, d, in_d, COMPUTE)
            acc += tl.where(k10, a * fy * (1 - fx), 0.0)[:, None] * _tile(value_ptr, t10, k10, d, in_d, COMPUTE)
            acc += tl.where(k11, a * fy * fx, 0.0)[:, None] * _tile(value_ptr, t11, k11, d, in_d, COMPUTE)
    tile = in_q[:, None] & in_d[None, :]
    tl.store(out_ptr + bag[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile)


@_jit
def _scatter(grad_value_ptr, offset, inside, weight, go, d, in_d):
    """grad_value[offset + d] += weight * go, atomically (relaxed), where ``inside``."""
    mask = inside[:, None] & in_d[None, :]
    tl.atomic_add(grad_value_ptr + offset[:, None] + d[None, :], weight[:, None] * go, mask=mask, sem="relaxed")


@_jit
def _entry(rows_ptr, weights_ptr, index, in_q, inside, row, rows, weight):
    """Entry ``index``: the table row ``row`` (``rows``, past the end, where not ``inside``) and the weight."""
    tl.store(rows_ptr + index, tl.where(inside, row, rows).to(rows_ptr.dtype.element_ty), mask=in_q)
    tl.store(weights_ptr + index, weight, mask=in_q)


@_jit
def _backward_kernel(
    grad_out_ptr,  # [N, Lq, M, D]
    value_ptr,  # [N, S, M, D]
    shapes_ptr,  # [L, 2] int64 (H, W)
    starts_ptr,  # [L] int64
    loc_ptr,  # [N, Lq, M, L, P, 2]
    attn_ptr,  # [N, Lq, M, L, P]
    grad_value_ptr,  # GRAD_VALUE == 1: [N, S, M, D] in COMPUTE, zeros
    grad_loc_ptr,  # GRAD_LOC: [N, Lq, M, L, P, 2]
    grad_attn_ptr,  # GRAD_ATTN: [N, Lq, M, L, P]
    rows_ptr,  # GRAD_VALUE == 2: [N, Lq, M, L, P, 4] value table row of each corner (`rows` if outside)
    weights_ptr,  # GRAD_VALUE == 2: [N, Lq, M, L, P, 4] its weight a * w_c, in COMPUTE
    S,
    Lq,
    M,
    D,
    L,
    P,
    rows,  # N*S*M: rows of value viewed as a table of D channels
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
    GRAD_VALUE: tl.constexpr,  # 0: none, 1: atomic adds, 2: (row, weight) entries
    GRAD_LOC: tl.constexpr,
    GRAD_ATTN: tl.constexpr,
):
    n, m, in_q, bag = _queries(Lq, M, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    go = tl.load(grad_out_ptr + bag[:, None] * D + d[None, :], mask=in_q[:, None] & in_d[None, :], other=0)
    go = go.to(COMPUTE)  # [BLOCK_Q, BLOCK_D]
    for lv in range(L):
        H = tl.load(shapes_ptr + 2 * lv)
        W = tl.load(shapes_ptr + 2 * lv + 1)
        start = tl.load(starts_ptr + lv)
        for p in range(P):
            s = (bag * L + lv) * P + p  # [BLOCK_Q] sample index
            a = tl.load(attn_ptr + s, mask=in_q, other=0).to(COMPUTE)
            fx, fy, r00, k00, k01, k10, k11 = _corners(loc_ptr, s, in_q, H, W, start, S, COMPUTE)
            gx = 1 - fx
            gy = 1 - fy
            w00 = tl.where(k00, gy * gx, 0.0)
            w01 = tl.where(k01, gy * fx, 0.0)
            w10 = tl.where(k10, fy * gx, 0.0)
            w11 = tl.where(k11, fy * fx, 0.0)
            t00 = ((n * S + r00) * M + m) * D  # [BLOCK_Q] element offset of corner (y0, x0)
            t01 = t00 + M * D
            t10 = t00 + W * M * D
            t11 = t10 + M * D
            if GRAD_LOC or GRAD_ATTN:
                # <grad_out[n, q, m], value[corner]>, 0 outside the map: [BLOCK_Q] each
                d00 = tl.sum(go * _tile(value_ptr, t00, k00, d, in_d, COMPUTE), axis=1)
                d01 = tl.sum(go * _tile(value_ptr, t01, k01, d, in_d, COMPUTE), axis=1)
                d10 = tl.sum(go * _tile(value_ptr, t10, k10, d, in_d, COMPUTE), axis=1)
                d11 = tl.sum(go * _tile(value_ptr, t11, k11, d, in_d, COMPUTE), axis=1)
                if GRAD_ATTN:
                    ga = w00 * d00 + w01 * d01 + w10 * d10 + w11 * d11
                    tl.store(grad_attn_ptr + s, ga.to(grad_attn_ptr.dtype.element_ty), mask=in_q)
                if GRAD_LOC:
                    # d out / d loc = d out / d pixel * size (pixel = loc * size - 0.5)
                    gl_x = a * W.to(COMPUTE) * ((d01 - d00) * gy + (d11 - d10) * fy)
                    gl_y = a * H.to(COMPUTE) * ((d10 - d00) * gx + (d11 - d01) * fx)
                    tl.store(grad_loc_ptr + 2 * s, gl_x.to(grad_loc_ptr.dtype.element_ty), mask=in_q)
                    tl.store(grad_loc_ptr + 2 * s + 1, gl_y.to(grad_loc_ptr.dtype.element_ty), mask=in_q)
            if GRAD_VALUE == 1:  # ATOMIC: grad_value[corner] += a * w_c * grad_out[n, q, m]
                _scatter(grad_value_ptr, t00, k00, a * w00, go, d, in_d)
                _scatter(grad_value_ptr, t01, k01, a * w01, go, d, in_d)
                _scatter(grad_value_ptr, t10, k10, a * w10, go, d, in_d)
                _scatter(grad_value_ptr, t11, k11, a * w11, go, d, in_d)
            if GRAD_VALUE == 2:  # ENTRIES: the table row and weight of each (sample, corner)
                row00 = (n * S + r00) * M + m
                _entry(rows_ptr, weights_ptr, 4 * s, in_q, k00, row00, rows, a * w00)
                _entry(rows_ptr, weights_ptr, 4 * s + 1, in_q, k01, row00 + M, rows, a * w01)
                _entry(rows_ptr, weights_ptr, 4 * s + 2, in_q, k10, row00 + W * M, rows, a * w10)
                _entry(rows_ptr, weights_ptr, 4 * s + 3, in_q, k11, row00 + (W + 1) * M, rows, a * w11)


@_jit
def _sum_rows_kernel(
    offsets_ptr,  # [rows + 1] first sorted entry of each table row
    order_ptr,  # [entries] the entries (sample * 4 + corner) sorted by row, stably
    weights_ptr,  # [entries] a * w_c of each entry, in COMPUTE
    grad_out_ptr,  # [N*Lq*M, D]
    grad_value_ptr,  # [rows, D]
    D,
    LP4,  # entries per (n, q, m) bag: L * P * 4
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    acc = tl.zeros([BLOCK_D], dtype=COMPUTE)
    first = tl.load(offsets_ptr + row)
    last = tl.load(offsets_ptr + row + 1)
    for i in range(first, last):  # in sample order: the same sum on every run
        entry = tl.load(order_ptr + i)
        w = tl.load(weights_ptr + entry)
        g = tl.load(grad_out_ptr + (entry // LP4) * D + d, mask=in_d, other=0).to(COMPUTE)
        acc += w * g
    tl.store(grad_value_ptr + row * D + d, acc.to(grad_value_ptr.dtype.element_ty), mask=in_d)


# ---------------------------------------------------------------------------------------------------------------
# The ops


class _Geometry(NamedTuple):
    N: int
    S: int
    M: int
    D: int
    Lq: int
    L: int
    P: int
    compute: torch.dtype
    block_q: int
    block_d: int

    @classmethod
    def of(cls, value: Tensor, loc: Tensor, attn: Tensor) -> _Geometry:
        N, S, M, D = value.shape
        _, Lq, _, L, P = attn.shape
        wide = torch.float64 if torch.float64 in (value.dtype, loc.dtype, attn.dtype) else torch.float32
        block_d = triton.next_power_of_2(max(D, 1))
        block_q = max(1, min(triton.next_power_of_2(max(Lq, 1)), 2048 // block_d, 64))  # tiles of <= 2048
        return cls(N, S, M, D, Lq, L, P, wide, block_q, block_d)

    def grid(self) -> tuple[int]:
        return (self.N * self.M * triton.cdiv(self.Lq, self.block_q),)


def _runnable(device: torch.device) -> None:
    why = unusable(device)
    if why is not None:  # (ms_deform_attn checks first, with a ShapeError; this is for direct calls of the ops)
        raise RuntimeError(f"blockgraph_msda_triton: the kernels cannot run here: {why}")


def _level_tables(shapes: Tensor, starts: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    return (
        shapes.to(device=device, dtype=torch.int64).contiguous(),
        starts.to(device=device, dtype=torch.int64).contiguous(),
    )


@torch.library.custom_op("blockgraph_msda_triton::forward", mutates_args=())
def _forward(value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
    g = _Geometry.of(value, loc, attn)
    out = value.new_empty(g.N, g.Lq, g.M * g.D)  # [N, Lq, M*D]
    if out.numel() == 0:
        return out.zero_()
    _runnable(value.device)
    shapes, starts = _level_tables(shapes, starts, value.device)
    _forward_kernel[g.grid()](
        value.contiguous(), shapes, starts, loc.contiguous(), attn.contiguous(), out,
        g.S, g.Lq, g.M, g.D, g.L, g.P,
        BLOCK_Q=g.block_q, BLOCK_D=g.block_d, COMPUTE=_TL_DTYPES[g.compute],
    )  # fmt: skip
    return out


_forward.register_fake(kernel_output_like)


@torch.library.custom_op("blockgraph_msda_triton::backward", mutates_args=())
def _backward(
    grad_out: Tensor,
    value: Tensor,
    shapes: Tensor,
    starts: Tensor,
    loc: Tensor,
    attn: Tensor,
    need_value: bool,
    need_loc: bool,
    need_attn: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. value, sampling_locations and attention_weights, each in its input's dtype (an empty
    ``[0]`` tensor for one not asked for, whose work is skipped)."""
    g = _Geometry.of(value, loc, attn)
    # (every sample's location and weight gradients are written by the kernel, once)
    grad_loc = torch.empty_like(loc, memory_format=torch.contiguous_format) if need_loc else loc.new_empty(0)
    grad_attn = torch.empty_like(attn, memory_format=torch.contiguous_format) if need_attn else attn.new_empty(0)
    none = value.new_empty(0)  # (outputs may not alias each other)
    samples = g.N * g.Lq * g.M * g.L * g.P
    if samples == 0 or g.D == 0 or not (need_value or need_loc or need_attn):  # nothing to sample: zeros
        grad_value = torch.zeros_like(value, memory_format=torch.contiguous_format) if need_value else none
        return grad_value, grad_loc.zero_(), grad_attn.zero_()
    _runnable(value.device)
    shapes, starts = _level_tables(shapes, starts, value.device)
    rows = g.N * g.S * g.M
    scatter, accumulate, table_rows, entry_weights = _NO_GRAD_VALUE, None, None, None
    if need_value and deterministic:
        scatter = _ENTRIES
        key = torch.int32 if rows < 2**31 - 1 else torch.int64
        table_rows = torch.empty(samples * 4, dtype=key, device=value.device)  # [N*Lq*M*L*P*4]
        entry_weights = torch.empty(samples * 4, dtype=g.compute, device=value.device)
    elif need_value:
        scatter = _ATOMIC
        accumulate = torch.zeros(value.shape, dtype=g.compute, device=value.device)  # [N, S, M, D]
    grad_out = grad_out.contiguous()
    _backward_kernel[g.grid()](
        grad_out, value.contiguous(), shapes, starts, loc.contiguous(), attn.contiguous(),
        accumulate, grad_loc if need_loc else None, grad_attn if need_attn else None, table_rows, entry_weights,
        g.S, g.Lq, g.M, g.D, g.L, g.P, rows,
        BLOCK_Q=g.block_q, BLOCK_D=g.block_d, COMPUTE=_TL_DTYPES[g.compute],
        GRAD_VALUE=scatter, GRAD_LOC=need_loc, GRAD_ATTN=need_attn,
    )  # fmt: skip
    if scatter == _ATOMIC:
        grad_value = accumulate.to(value.dtype)
    elif scatter == _ENTRIES:
        grad_value = _sum_sorted(g, table_rows, entry_weights, grad_out, value.dtype)
    else:
        grad_value = none
    return grad_value, grad_loc, grad_attn


def _sum_sorted(g: _Geometry, table_rows: Tensor, weights: Tensor, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
    """The deterministic value gradient: each table row sums its (sample, corner) entries in sample order."""
    rows = g.N * g.S * g.M
    sorted_rows, order = torch.sort(table_rows, stable=True)  # entries hitting each row, in sample order
    every_row = torch.arange(rows + 1, device=table_rows.device, dtype=table_rows.dtype)
    offsets = torch.searchsorted(sorted_rows, every_row)  # [rows + 1]; entries past offsets[rows]: outside
    del sorted_rows
    grad_value = torch.empty(g.N, g.S, g.M, g.D, dtype=dtype, device=grad_out.device)  # [N, S, M, D]
    if rows:
        _sum_rows_kernel[(rows,)](
            offsets, order, weights, grad_out, grad_value, g.D, g.L * g.P * 4,
            BLOCK_D=g.block_d, COMPUTE=_TL_DTYPES[g.compute], num_warps=1,
        )  # fmt: skip
    return grad_value


_backward.register_fake(kernel_grads_like)


def _autograd(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    deterministic = torch.are_deterministic_algorithms_enabled()
    return kernel_grads(ctx, grad_out, torch.ops.blockgraph_msda_triton.backward, deterministic)


_forward.register_autograd(_autograd, setup_context=save_kernel_inputs)
_backward.register_autograd(partial(refuse_double_backward, "Triton"))
