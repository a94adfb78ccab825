"""Multi-scale deformable attention core (Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object
Detection", ICLR 2021), ARCHITECTURES.md 6.6.

Every query q of head m samples P points on each of L feature maps, bilinearly with zero padding and
``align_corners=False`` (pixel coordinate = loc * W - 0.5; a corner outside the map contributes 0), and returns the
attention-weighted sum of the samples::

    out[n, q, m*D + d] = sum_{l, p} A[n, q, m, l, p] * bilinear(value[n, level l, m, d], loc[n, q, m, l, p])

Five implementations share that contract:

- :func:`ms_deform_attn_reference`: the upstream ``ms_deform_attn_core_pytorch`` (four-corner ``F.grid_sample`` per
  level, stack, multiply, sum), kept as the oracle. It materializes ``[N*M, D, Lq, L*P]`` several times over.
- ``"cpp"``: fused C++ kernels (``csrc/ms_deform_attn.cpp``, built on first use by ``_cpp``). One pass over the
  samples gathers the four corners of every (level, point) from ``value`` in its native ``[N, S, M, D]`` layout,
  with the attention weight folded into the corner weights; nothing of size ``[.., L, P, 4, D]`` exists. Its
  backward is one pass too. The ops have fake kernels (meta tensors, torch.compile) and a registered autograd.
- ``"torch"``: the same gather in pure PyTorch: ``F.embedding_bag`` over ``value`` viewed as a table of ``N*S*M``
  rows of D channels, one bag of L*P (row, corner weight) pairs per (n, q, m) and corner, chunked over queries to
  bound memory. Used when the C++ kernel cannot be built, off the CPU (meta), or on request.
- ``"triton"``: Triton kernels (``_msda_triton``, imported on first use; ``pip install 'blockgraph[gpu]'``) for CUDA
  tensors, the C++ kernel's math with one program per (batch, head, block of queries). It takes bfloat16/float16
  inputs as they are and computes in float32 inside (no float32 copies of ``value`` or of the output). On CPU
  tensors it runs in Triton's interpreter, where triton was imported with ``TRITON_INTERPRET=1`` (tests). Same fake
  kernels and autograd registration as the C++ ops.
- ``"gather"``: the same bilinear sampling written with plain tensor ops only (index arithmetic, one
  ``index_select`` per corner, a batched matmul with the weights; no loop over chunks, no custom op, no
  ``grid_sample``), so that exporters (``torch.onnx.export``, ``torch.export``) see an ordinary graph: ONNX gets
  Gather/MatMul nodes any runtime runs. ``"auto"`` picks it while exporting. Differentiable by autograd (any order),
  but it materializes ``[N*M*Lq*L*P, D]`` per corner: for export and inference, not training.

The fast paths have their own backward (gradients w.r.t. value, sampling locations and attention weights; first
order only). The backward recomputes the corner geometry from the locations (a few cheap elementwise ops) rather
than keeping ``[.., L, P, 4]`` index and weight tables alive between forward and backward. The CPU ones are
deterministic, without atomics or racing writes:

- ``"cpp"`` parallelizes its backward over heads (n, m) (or (n, m, l) when heads are fewer than 2 x threads): a
  task owns the slice ``grad_value[n, :, m, :]`` (of its levels) and the location/weight gradients of its samples,
  and visits its samples in a fixed order, so each sum is taken in the same order whatever the number of threads
  or the task split (see the kernel's header).
- ``"torch"`` forms grad_value as the transposed gather: a *stable* sort of the samples by the table row of their
  corner 0 lists, for every row, the samples anchored there in a unique order, and ``F.embedding_bag`` over
  ``grad_out`` sums each list sequentially (one bag per row; bags are independent), once per corner. The dot
  products for the location/weight gradients are independent, one per (sample, corner).

``"triton"`` scatters the value gradient with atomic adds (the order of the additions varies between runs on a
GPU); under ``torch.use_deterministic_algorithms(True)`` it sums each value row's contributions in a fixed order
instead (a stable sort of the (sample, corner) pairs by the row they hit, then one program per row; see
``_msda_triton``). Its location and weight gradients are deterministic either way.

Pixel coordinates are rounded as grid_sample rounds them: it unnormalizes g = 2 * loc - 1 as
(g + 1) * (W / 2) - 0.5, one fused multiply-add in its vectorized CPU kernels where torch's build uses FMA (AVX2,
AVX512); ``torch.addcmul`` is vectorized the same way and the C++ kernel uses ``std::fma`` exactly where torch
does. floor() of our coordinate then equals the reference's, which matters at pixel centres, where the bilinear
map has a kink and the derivative w.r.t. the location is one-sided: both take the same side.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from blockgraph.errors import ShapeError
from blockgraph.ops import _cpp
from blockgraph.ops._msda_ops import (
    kernel_grads,
    kernel_grads_like,
    kernel_output_like,
    refuse_double_backward,
    save_kernel_inputs,
)

Backend = Literal["auto", "cpp", "triton", "torch", "gather", "reference"]

CHUNK_SAMPLES = 1 << 17
"""Samples (n, q, m, l, p) the pure path handles at once: bounds its scratch memory to a few tens of MB."""

__all__ = ["ms_deform_attn", "ms_deform_attn_backend", "ms_deform_attn_reference"]


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: Backend = "auto",
) -> Tensor:
    """Multi-scale deformable attention sampling (Zhu et al., Deformable DETR, ICLR 2021), fast path.

    Args:
        value: ``[N, S, M, D]``, the L flattened feature maps of every head (S = sum of H_l * W_l).
        spatial_shapes: ``[L, 2]`` long, (H_l, W_l) per level.
        level_start_index: ``[L]`` long, the first row of each level in ``value``.
        sampling_locations: ``[N, Lq, M, L, P, 2]``, normalized (x, y); (0, 0) is the top-left corner of the map,
            (1, 1) the bottom-right. Values outside [0, 1] are allowed (zero padding).
        attention_weights: ``[N, Lq, M, L, P]``.
        backend: ``"auto"`` (``"gather"`` while exporting; else the C++ kernel when it builds and the tensors are
            on the CPU, the Triton kernels when triton is installed and they are on a CUDA device, else
            ``"torch"``), ``"cpp"``, ``"triton"`` (CUDA tensors; CPU tensors in Triton's interpreter, with
            ``TRITON_INTERPRET=1`` set before Python starts), ``"torch"`` (pure-PyTorch fused gather),
            ``"gather"`` (plain tensor ops, for export), or ``"reference"`` (:func:`ms_deform_attn_reference`).

    Returns:
        ``[N, Lq, M*D]``, channel ``m*D + d``. Differentiable in value, sampling_locations and attention_weights.

    Reduced precision: with any of the three in bfloat16 or float16 (as under ``torch.autocast``, which leaves the
    sampling locations in float32), every backend computes in float32 (autocast off inside) and the result takes
    ``value``'s dtype; gradients flow back through the casts to each input's own dtype. The Triton kernels take
    the three in their own dtypes (they need not agree) and compute in float32 inside, with the same results and
    no float32 copies.

    Raises:
        ShapeError: inconsistent shapes or dtypes, or ``backend="cpp"`` / ``"triton"`` where that kernel is
            unavailable.
    """
    floats = (value, sampling_locations, attention_weights)
    reduced = all(t.dtype.is_floating_point for t in floats) and any(t.dtype in _REDUCED for t in floats)
    if reduced and not _takes_reduced(backend, value):
        with torch.autocast(value.device.type, enabled=False):
            wide = [t.float() if t.dtype in _REDUCED else t for t in floats]
            compute = torch.promote_types(torch.promote_types(wide[0].dtype, wide[1].dtype), wide[2].dtype)
            v, loc, attn = (t.to(compute) for t in wide)
            out = ms_deform_attn(v, spatial_shapes, level_start_index, loc, attn, backend=backend)
        return out.to(value.dtype)
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, same_dtype=not reduced)
    chosen = _resolve(backend, value)
    if chosen == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if chosen == "gather":
        return _plain_gather(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if chosen == "cpp":
        return torch.ops.blockgraph_msda.forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if chosen == "triton":
        return _triton.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _Gather.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def ms_deform_attn_backend(value: Tensor | None = None) -> Literal["cpp", "triton", "torch", "gather"]:
    """The implementation ``backend="auto"`` runs (for ``value``'s device and dtype, when given; the CPU without).

    ``"gather"`` while a graph is being exported (``torch.onnx.export``, ``torch.export``); ``"triton"`` for CUDA
    tensors when triton imports; the C++ kernel for float32/float64 CPU tensors (built on the first call unless
    ``BLOCKGRAPH_NO_CPP=1``); else ``"torch"``.
    """
    if exporting():
        return "gather"
    if value is not None and value.device.type == "cuda":
        return "triton" if _triton_available() else "torch"
    if value is not None and (value.device.type != "cpu" or value.dtype not in (torch.float32, torch.float64)):
        return "torch"
    return "cpp" if _cpp_available() else "torch"


def exporting() -> bool:
    """Whether torch is tracing a graph for export (ONNX, either exporter; ``torch.export``): custom ops and
    autograd Functions would not survive there."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


@torch.compiler.assume_constant_result
def _cpp_available() -> bool:
    """Whether the C++ kernel is usable (built on the first call); torch.compile evaluates it once, at trace time."""
    return _cpp.load()


_triton: ModuleType | None = None
_triton_failure = ""


def _triton_module() -> ModuleType | None:
    """The Triton backend's module (``_msda_triton``), imported on the first call (never by ``import blockgraph``);
    None when triton is missing or fails to import (:data:`_triton_failure` says why; not retried). Kept in
    :data:`_triton` once imported."""
    global _triton, _triton_failure
    if _triton is None and not _triton_failure:
        try:
            from blockgraph.ops import _msda_triton
        except Exception as e:  # ImportError without triton; a broken install may raise anything
            _triton_failure = f"{type(e).__name__}: {e}"
        else:
            _triton = _msda_triton
    return _triton


@torch.compiler.assume_constant_result
def _triton_available() -> bool:
    """Whether the Triton kernels import (then :data:`_triton` is their module); torch.compile evaluates it once,
    at trace time (the import is not traced)."""
    return _triton_module() is not None


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The grid_sample formulation (upstream ``ms_deform_attn_core_pytorch``, ARCHITECTURES.md 6.6): the oracle.

    Same arguments and result as :func:`ms_deform_attn`; ``level_start_index`` is unused (levels are consecutive).
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (H, W) in enumerate(spatial_shapes.tolist()):
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(N * M, D, H, W)  # [N*M, D, H, W]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N*M, Lq, P, 2]
        samples.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [N*M, D, Lq, P]
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)  # [N*M, 1, Lq, L*P]
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()  # [N, Lq, M*D]


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


_REDUCED = (torch.bfloat16, torch.float16)
"""Dtypes the op computes in float32 (see :func:`ms_deform_attn`)."""


def _check(
    value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor, *, same_dtype: bool = True
) -> None:
    """Shape and dtype checks at the public boundary (the kernels assume them). ``same_dtype=False``: the three
    floating tensors may differ in dtype (the Triton kernels' reduced precision)."""
    if value.dim() != 4 or loc.dim() != 6 or attn.dim() != 5 or loc.shape[-1] != 2:
        raise ShapeError(
            "ms_deform_attn expects value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2] and "
            f"attention_weights [N, Lq, M, L, P]; got {list(value.shape)}, {list(loc.shape)}, {list(attn.shape)}"
        )
    N, _, M, _ = value.shape
    L = loc.shape[3]
    if loc.shape[:5] != attn.shape or loc.shape[0] != N or loc.shape[2] != M:
        raise ShapeError(
            f"ms_deform_attn: sampling_locations {list(loc.shape)} and attention_weights {list(attn.shape)} do not "
            f"match value {list(value.shape)} (N={N}, M={M})",
            hint="sampling_locations[..., :-1] must have the shape of attention_weights, [N, Lq, M, L, P]",
        )
    if tuple(shapes.shape) != (L, 2) or tuple(starts.shape) != (L,):
        raise ShapeError(
            f"ms_deform_attn: {L} levels in sampling_locations, but spatial_shapes is {list(shapes.shape)} and "
            f"level_start_index is {list(starts.shape)}",
            hint=f"spatial_shapes must be [{L}, 2] (H, W rows) and level_start_index [{L}]",
        )
    if shapes.is_floating_point() or starts.is_floating_point():
        raise ShapeError(
            f"ms_deform_attn: spatial_shapes and level_start_index must be integer tensors; got {shapes.dtype}, "
            f"{starts.dtype}"
        )
    if same_dtype and not (value.dtype == loc.dtype == attn.dtype and value.dtype.is_floating_point):
        raise ShapeError(
            f"ms_deform_attn: value, sampling_locations and attention_weights must share one floating dtype; got "
            f"{value.dtype}, {loc.dtype}, {attn.dtype}"
        )


def _takes_reduced(backend: Backend, value: Tensor) -> bool:
    """Whether the backend takes bfloat16/float16 inputs as they are (the Triton kernels); the others get float32
    copies."""
    return backend == "triton" or (backend == "auto" and ms_deform_attn_backend(value) == "triton")


def _resolve(backend: Backend, value: Tensor) -> Literal["cpp", "triton", "torch", "gather", "reference"]:
    """The implementation that runs, or a ShapeError saying why the one requested cannot."""
    if backend == "auto":
        return ms_deform_attn_backend(value)
    if backend == "triton":
        if not _triton_available():
            raise ShapeError(
                f"ms_deform_attn: the Triton kernels are unavailable ({_triton_failure})",
                hint='install triton (pip install "blockgraph[gpu]"), or use backend="auto"',
            )
        why = _triton.unusable(value.device)
        if why is not None:
            hint = 'use backend="torch" or "auto"'
            if value.device.type == "cpu":
                hint = 'use backend="auto", or run Python with TRITON_INTERPRET=1 for Triton\'s interpreter (slow)'
            raise ShapeError(
                f"ms_deform_attn: the Triton kernels cannot run on {value.device} tensors: {why}", hint=hint
            )
        return "triton"
    if backend == "cpp":
        if value.device.type not in ("cpu", "meta") or value.dtype not in (torch.float32, torch.float64):
            raise ShapeError(
                f"ms_deform_attn: the C++ kernel takes float32/float64 CPU tensors, got {value.dtype} on "
                f"{value.device}",
                hint='use backend="torch" or "auto"',
            )
        if not _cpp_available():
            raise ShapeError(
                f"ms_deform_attn: the C++ kernel is unavailable ({_cpp.failure() or 'not built'})",
                hint='use backend="torch" or "auto"',
            )
        return "cpp"
    if backend in ("torch", "gather", "reference"):
        return backend
    raise ShapeError(
        f"ms_deform_attn: unknown backend {backend!r}",
        hint="one of 'auto', 'cpp', 'triton', 'torch', 'gather', 'reference'",
    )


# ---------------------------------------------------------------------------------------------------------------
# C++ backend: the ops come from csrc/ms_deform_attn.cpp; registered here with the fake kernels and autograd formula
# the kernel backends share (_msda_ops).


def _register_cpp_op() -> None:
    """Teach torch the shapes (for meta/fake tensors and torch.compile) and the autograd of the C++ ops."""
    torch.library.register_fake("blockgraph_msda::forward")(kernel_output_like)
    torch.library.register_fake("blockgraph_msda::backward")(kernel_grads_like)
    torch.library.register_autograd("blockgraph_msda::forward", _cpp_backward, setup_context=save_kernel_inputs)
    torch.library.register_autograd("blockgraph_msda::backward", partial(refuse_double_backward, "C++"))


def _cpp_backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    return kernel_grads(ctx, grad_out, torch.ops.blockgraph_msda.backward)


_cpp.after_load(_register_cpp_op)


# ---------------------------------------------------------------------------------------------------------------
# Export backend: plain tensor ops (index arithmetic, index_select, bmm), traceable into any graph format.


def _plain_gather(value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
    """Bilinear sampling as four gathers from ``value`` viewed as a table of ``N*M*S`` rows of D channels.

    Everything is a tensor op on the inputs (level sizes and starts are read from the tensors, never turned into
    Python numbers), so a trace with a symbolic batch or map size stays valid. A corner outside its map reads row 0
    with weight 0 (zero padding); so does a NaN location.
    """
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    table = value.transpose(1, 2).reshape(N * M * S, D)  # [N*M*S, D], row (n*M + m)*S + s
    shapes, starts = shapes.to(value.device), starts.to(value.device)
    size = shapes.flip(-1).to(loc.dtype)  # [L, 2] (W, H)
    # Pixel coordinates, rounded as grid_sample rounds them (see the module docstring): (2 loc - 1 + 1) W/2 - 0.5.
    grid_plus_one = loc.transpose(1, 2) * 2 - 1 + 1  # [N, M, Lq, L, P, 2]
    pix = torch.addcmul(torch.tensor(-0.5, dtype=loc.dtype, device=loc.device), grid_plus_one, size[:, None] / 2)
    corner0 = pix.floor()  # [N, M, Lq, L, P, 2] (x0, y0)
    frac = pix - corner0
    width = shapes[:, 1].view(L, 1)  # [L, 1], broadcast over P
    heads = torch.arange(N * M, device=value.device).view(N, M, 1, 1, 1) * S  # [N, M, 1, 1, 1] first row of (n, m)
    first = heads + starts.view(L, 1)  # [N, M, 1, L, 1] first row of (n, m, level)
    attn = attn.transpose(1, 2)  # [N, M, Lq, L, P]
    out = None
    for dy in (0, 1):
        for dx in (0, 1):
            x, y = corner0[..., 0] + dx, corner0[..., 1] + dy  # [N, M, Lq, L, P] each
            inside = (x >= 0) & (x < size[:, 0:1]) & (y >= 0) & (y < size[:, 1:2])  # False for NaN too
            wx = frac[..., 0] if dx else 1 - frac[..., 0]
            wy = frac[..., 1] if dy else 1 - frac[..., 1]
            weight = torch.where(inside, wx * wy * attn, 0)  # [N, M, Lq, L, P]
            row = torch.where(inside, first + y.long() * width + x.long(), 0)  # [N, M, Lq, L, P]
            samples = table.index_select(0, row.reshape(-1)).view(N * M * Lq, L * P, D)  # [N*M*Lq, L*P, D]
            term = torch.bmm(weight.reshape(N * M * Lq, 1, L * P), samples)  # [N*M*Lq, 1, D]
            out = term if out is None else out + term
    return out.view(N, M, Lq, D).transpose(1, 2).reshape(N, Lq, M * D)  # [N, Lq, M*D]


# ---------------------------------------------------------------------------------------------------------------
# Pure-PyTorch backend: embedding_bag gather over value viewed as a table of N*S*M rows of D channels.
#
# Tables are built per chunk of (n, q) rows in a corner-major layout, [4, R*M, L*P], with per-level constants
# broadcast as [L*P] vectors, so that every elementwise op runs over contiguous memory. Corner c is
# (y0 + c // 2, x0 + c % 2); a corner outside its map keeps a clamped (valid) row and a zero weight.


class _Gather(torch.autograd.Function):
    """Pure-PyTorch fused gather with its own (deterministic) backward."""

    @staticmethod
    def forward(value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
        return _gather_forward(value, shapes, starts, loc, attn)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)  # value, spatial_shapes, level_start_index, sampling_locations, weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        value, shapes, starts, loc, attn = ctx.saved_tensors
        need_value, _, _, need_loc, need_attn = ctx.needs_input_grad
        grad_value, grad_loc, grad_attn = _gather_backward(
            grad_out, value, shapes, starts, loc, attn, need_value, need_loc, need_attn
        )
        return grad_value, None, None, grad_loc, grad_attn


class _Levels:
    """Per-level constants of one call, as ``[L*P]`` vectors (level l repeated P times) in the dtypes needed."""

    def __init__(self, value: Tensor, shapes: Tensor, starts: Tensor, L: int, P: int) -> None:
        N, S, M, _ = value.shape
        device, dtype = value.device, value.dtype
        self.rows = N * S * M  # rows of the table
        # Index arithmetic runs in floating point: exact below 2**24 (float32) or 2**53 (float64).
        self.exact = torch.float32 if dtype == torch.float32 and self.rows < 2**23 else torch.float64
        wh = shapes.flip(-1).to(device=device, dtype=dtype)  # [L, 2] (W, H)
        self.size = wh.t()[:, :, None].expand(2, L, P).reshape(2, 1, L * P)  # [2, 1, L*P] (W..., H...)
        self.half = self.size / 2  # [2, 1, L*P]
        W = shapes[:, 1].to(device=device, dtype=self.exact)[:, None].expand(L, P).reshape(L * P)  # [L*P]
        self.width = W  # [L*P]
        self.start = starts.to(device=device, dtype=self.exact)[:, None].expand(L, P).reshape(L * P) * M  # [L*P]
        self.step = torch.stack((torch.zeros_like(W), torch.ones_like(W), W, W + 1))[:, None, :] * M  # [4, 1, L*P]


class _Chunk:
    """The bilinear corners of the samples of (n, q) rows ``row0 .. row0+R`` (corner-major, see above)."""

    def __init__(self, lv: _Levels, loc: Tensor, row0: int, Lq: int, S: int, M: int) -> None:
        R, _, L, P, _ = loc.shape
        LP = L * P
        xy = loc.reshape(R * M, LP, 2).movedim(-1, 0).clone(memory_format=torch.contiguous_format)  # [2, R*M, L*P]
        # Pixel coordinates, rounded as grid_sample rounds them (see the module docstring).
        grid_plus_one = xy.mul_(2).sub_(1).add_(1)  # [2, R*M, L*P] the reference's grid 2 * loc - 1, plus 1
        pix = torch.addcmul(
            torch.tensor(-0.5, dtype=loc.dtype, device=loc.device), grid_plus_one, lv.half
        )  # [2, R*M, L*P]
        corner0 = pix.floor().nan_to_num_(nan=-2.0)  # [2, R*M, L*P] (x0, y0); NaN lands outside every map
        self.frac = pix - corner0  # [2, R*M, L*P] (fx, fy)
        inside = torch.empty((2, 2, R * M, LP), dtype=torch.bool, device=loc.device)  # [lo/hi, x/y, R*M, L*P]
        torch.logical_and(corner0 >= 0, corner0 < lv.size, out=inside[0])
        torch.logical_and(corner0 >= -1, corner0 < lv.size - 1, out=inside[1])
        self.axis = torch.empty((2, 2, R * M, LP), dtype=loc.dtype, device=loc.device)  # weights, as `inside`
        zero = torch.zeros((), dtype=loc.dtype, device=loc.device)
        torch.where(inside[0], 1 - self.frac, zero, out=self.axis[0])
        torch.where(inside[1], self.frac, zero, out=self.axis[1])
        self.inside = (inside[:, None, 1] & inside[None, :, 0]).view(4, R * M, LP)  # [4, R*M, L*P]
        self.corner0 = corner0
        # Row of corner 0 in the table: ((n*S + start_l + y0*W_l + x0) * M + m).
        n_rows = torch.div(torch.arange(row0, row0 + R, device=loc.device), Lq, rounding_mode="floor") * (S * M)
        heads = torch.arange(M, device=loc.device)
        self.head_row = (n_rows[:, None, None] + heads[None, :, None]).to(lv.exact) + lv.start  # [R, M, L*P]
        x0, y0 = corner0.to(lv.exact)  # [R*M, L*P] each
        row = torch.addcmul(x0, y0, lv.width).mul_(M).add_(self.head_row.view(R * M, LP))  # [R*M, L*P]
        self.index = (row + lv.step).clamp_(0, lv.rows - 1).long()  # [4, R*M, L*P]

    def weights(self, attn: Tensor) -> Tensor:
        """Corner weights times the attention weights ``attn`` [R*M, L*P]: ``[4, R*M, L*P]``."""
        wy = self.axis[:, 1] * attn  # [2, R*M, L*P]
        return (wy[:, None] * self.axis[None, :, 0]).flatten(0, 1)  # [4, R*M, L*P]


def _chunks(rows: int, samples_per_row: int) -> list[tuple[int, int]]:
    """Split ``rows`` (n, q) rows into ranges of about CHUNK_SAMPLES samples."""
    step = max(1, CHUNK_SAMPLES // max(1, samples_per_row))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def _gather_forward(value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    lv = _Levels(value, shapes, starts, L, P)
    table = value.contiguous().view(N * S * M, D)  # [N*S*M, D], value's own memory
    loc_rows = loc.reshape(N * Lq, M, L, P, 2)  # [N*Lq, M, L, P, 2]
    attn_rows = attn.reshape(N * Lq * M, L * P)  # [N*Lq*M, L*P]
    out = value.new_empty(N * Lq * M, D)  # [N*Lq*M, D], row (n, q, m)
    for r0, r1 in _chunks(N * Lq, M * L * P):
        chunk = _Chunk(lv, loc_rows[r0:r1], r0, Lq, S, M)
        weight = chunk.weights(attn_rows[r0 * M : r1 * M])  # [4, R*M, L*P]
        acc = out[r0 * M : r1 * M]  # [R*M, D]
        for c in range(4):
            bags = F.embedding_bag(chunk.index[c], table, per_sample_weights=weight[c], mode="sum")  # [R*M, D]
            acc.copy_(bags) if c == 0 else acc.add_(bags)
    return out.view(N, Lq, M * D)


def _gather_backward(
    grad_out: Tensor,
    value: Tensor,
    shapes: Tensor,
    starts: Tensor,
    loc: Tensor,
    attn: Tensor,
    need_value: bool,
    need_loc: bool,
    need_attn: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    LP = L * P
    lv = _Levels(value, shapes, starts, L, P)
    table = value.contiguous().view(N * S * M, D)  # [N*S*M, D]
    grad_bags = grad_out.contiguous().view(N * Lq * M, D)  # [N*Lq*M, D], bag (n, q, m)
    loc_rows = loc.reshape(N * Lq, M, L, P, 2)  # [N*Lq, M, L, P, 2]
    attn_rows = attn.reshape(N * Lq * M, LP)  # [N*Lq*M, L*P]
    grad_loc = torch.empty_like(loc_rows) if need_loc else None  # [N*Lq, M, L, P, 2]
    grad_attn = torch.empty_like(attn_rows) if need_attn else None  # [N*Lq*M, L*P]
    anchored = _Anchored(N * Lq * M, LP, lv, value) if need_value else None
    for r0, r1 in _chunks(N * Lq, M * LP):
        R = r1 - r0
        chunk = _Chunk(lv, loc_rows[r0:r1], r0, Lq, S, M)
        a = attn_rows[r0 * M : r1 * M]  # [R*M, L*P]
        if need_loc or need_attn:
            # <grad_out[n, q, m], value[corner]>: independent dot products, one per (sample, corner).
            bag_of_sample = torch.arange(R * M, device=value.device).repeat_interleave(LP)  # [R*M*L*P]
            offsets = torch.arange(0, R * M * LP, LP, device=value.device)  # [R*M]
            dots = torch.stack(
                [
                    torch.ops.aten._embedding_bag_per_sample_weights_backward(
                        grad_bags[r0 * M : r1 * M], table, chunk.index[c].view(-1), offsets, bag_of_sample, 0, -1
                    )
                    for c in range(4)
                ]
            ).view(4, R * M, LP)
            dots = torch.where(chunk.inside, dots, 0)  # [4, R*M, L*P]; corners outside read zeros
            if need_attn:
                grad_attn[r0 * M : r1 * M] = (chunk.weights(torch.ones_like(a)) * dots).sum(0)
            if need_loc:
                fx, fy = chunk.frac  # [R*M, L*P] each
                d0, d1, d2, d3 = dots
                grad_x = torch.addcmul((d1 - d0) * (1 - fy), d3 - d2, fy)  # d out / d pixel x, per unit weight
                grad_y = torch.addcmul((d2 - d0) * (1 - fx), d3 - d1, fx)
                grad_pix = torch.stack((grad_x, grad_y)) * (a * lv.size)  # [2, R*M, L*P] d / d loc
                grad_loc[r0:r1] = grad_pix.view(2, R, M, L, P).movedim(0, -1)
        if need_value:
            rows = slice(r0 * M, r1 * M)
            anchored.anchor[rows], anchored.weight[:, rows] = _reanchor(lv, chunk, a, M)
    grad_value = _grad_value(lv, grad_bags, anchored, value.shape, shapes, starts) if need_value else None
    return (
        grad_value,
        grad_loc.view(loc.shape) if need_loc else None,
        grad_attn.view(attn.shape) if need_attn else None,
    )


class _Anchored:
    """The re-anchored corners of every sample (:func:`_reanchor`), filled chunk by chunk and then sorted once."""

    def __init__(self, bags: int, LP: int, lv: _Levels, value: Tensor) -> None:
        small = max(bags, lv.rows + 1) < 2**31  # int32 indices sort faster and take half the memory
        self.index_dtype = torch.int32 if small else torch.int64
        self.anchor = torch.empty(bags, LP, dtype=self.index_dtype, device=value.device)  # [N*Lq*M, L*P]
        self.weight = value.new_empty(4, bags, LP)  # [4, N*Lq*M, L*P]

    def sort(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """CSR by anchor row, releasing the unsorted buffers on the way (they are the largest).

        Returns:
            ``offsets`` [rows + 1], the first sorted sample of each row (row ``rows`` is empty); ``source``
            [samples], the bag (n, q, m) of each sorted sample; ``weight`` [4, samples], its corner weights.
        """
        LP = self.anchor.shape[1]
        keys, order = torch.sort(self.anchor.view(-1), stable=True)  # [N*Lq*M*L*P]
        self.anchor = None
        every_row = torch.arange(rows + 1, device=keys.device, dtype=self.index_dtype)
        offsets = torch.searchsorted(keys, every_row, out_int32=self.index_dtype == torch.int32)  # [rows + 1]
        del keys
        weight = self.weight.view(4, -1).index_select(1, order)  # [4, N*Lq*M*L*P]
        self.weight = None
        source = torch.div(order, LP, rounding_mode="floor").to(self.index_dtype)  # [N*Lq*M*L*P]
        return offsets, source, weight


def _reanchor(lv: _Levels, chunk: _Chunk, attn: Tensor, M: int) -> tuple[Tensor, Tensor]:
    """Move each sample's corner 0 inside its map, so that every table row a sample touches is in its own level.

    A sample at x0 = -1 only touches column 0 through its corners x0 + 1: it is re-anchored at x0 = 0 with those
    weights moved to the corners x0 (likewise in y). Samples touching nothing keep zero weights and a clamped anchor.

    Returns:
        ``anchor`` [R*M, L*P], the table row of the new corner 0 (integral values in a floating dtype);
        ``weight`` [4, R*M, L*P], the corner weights times ``attn`` in the new frame.
    """
    shift = chunk.corner0 == -1  # [2, R*M, L*P] (x, y)
    lo = torch.where(shift, chunk.axis[1], chunk.axis[0])  # [2, R*M, L*P]
    hi = torch.where(shift, 0, chunk.axis[1])
    corner0 = torch.minimum((chunk.corner0 + shift).clamp_(min=0), lv.size - 1).to(lv.exact)  # [2, R*M, L*P]
    x0, y0 = corner0
    R_M, LP = x0.shape
    anchor = torch.addcmul(x0, y0, lv.width).mul_(M).add_(chunk.head_row.view(R_M, LP))  # [R*M, L*P], integral
    wy = torch.stack((lo[1], hi[1])) * attn  # [2, R*M, L*P]
    wx = torch.stack((lo[0], hi[0]))
    return anchor, (wy[:, None] * wx[None, :]).flatten(0, 1)  # [R*M, L*P], [4, R*M, L*P]


def _grad_value(
    lv: _Levels,
    grad_bags: Tensor,
    anchored: _Anchored,
    value_shape: torch.Size,
    shapes: Tensor,
    starts: Tensor,
) -> Tensor:
    """grad_value as the transposed gather, deterministically.

    A stable sort of the sample anchors lists, for every table row, the samples anchored there in a unique order;
    ``F.embedding_bag`` over ``grad_out`` then sums each list sequentially (one bag per row, computed independently),
    once per corner c, and the sum for corner c is added to the row ``step_c`` further (right, down, or both).
    """
    N, S, M, D = value_shape
    device = grad_bags.device
    offsets, source, weights = anchored.sort(lv.rows)  # bag N*S*M (the last) stays empty: a zero row
    # Where each table row r = (n*S + s)*M + m lies: level, pixel (y, x).
    row = torch.arange(lv.rows, device=device)  # [N*S*M]
    s = torch.div(row, M, rounding_mode="floor") % S  # [N*S*M]
    first = starts.to(device)[:, None]  # [L, 1]
    member = (s >= first) & (s < first + (shapes[:, 0] * shapes[:, 1]).to(device)[:, None])  # [L, N*S*M]
    level = (member * torch.arange(len(first), device=device)[:, None]).sum(0)  # [N*S*M] (0 outside every level)
    width = shapes[:, 1].to(device)[level].clamp(min=1)  # [N*S*M]
    pixel = s - first[level, 0]
    x, y = pixel % width, torch.div(pixel, width, rounding_mode="floor")
    inside = member.any(0)
    grad = grad_bags.new_empty(lv.rows, D)  # [N*S*M, D]
    for c in range(4):
        dx, dy = c % 2, c // 2
        bags = F.embedding_bag(
            source, grad_bags, offsets, per_sample_weights=weights[c], mode="sum", include_last_offset=False
        )  # [N*S*M + 1, D]: the corner-c contributions of the samples anchored at each row; the last row is 0
        if c == 0:
            grad.copy_(bags[:-1])
            continue
        anchor_row = row - (dx + dy * width) * M  # [N*S*M] the anchor whose corner c is this row
        anchor_row.masked_fill_(~(inside & (x >= dx) & (y >= dy)), lv.rows)  # none: read the zero row
        grad += bags.index_select(0, anchor_row)
    return grad.view(N, S, M, D)
