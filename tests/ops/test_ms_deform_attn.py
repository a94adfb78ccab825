"""blockgraph.ops.ms_deform_attn (Zhu et al., Deformable DETR, ICLR 2021): the fast paths against the grid_sample
reference and an independent per-sample loop; gradients, determinism, meta tensors, torch.compile, bad inputs."""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from blockgraph.errors import ShapeError
from blockgraph.ops import _cpp, ms_deform_attn, ms_deform_attn_backend, ms_deform_attn_reference

msda_module = importlib.import_module("blockgraph.ops.ms_deform_attn")  # the module (the package exports the function)

LEVELS = [(5, 7), (3, 4), (2, 2), (1, 3)]  # several levels, non-square, one of a single row
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _cpp_or_skip() -> None:
    if _cpp.disabled_by_env():
        pytest.skip(f"{_cpp.DISABLE_ENV} is set")
    if not _cpp.load():
        pytest.skip(f"the C++ kernel did not build: {_cpp.failure()}")


@pytest.fixture(params=["torch", "cpp", "gather"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each fast path (and the export path, plain ops); the C++ one only where it builds."""
    if request.param == "cpp":
        _cpp_or_skip()
    return request.param


def levels(shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    spatial = torch.tensor(shapes)  # [L, 2] (H, W)
    sizes = spatial[:, 0] * spatial[:, 1]
    return spatial, torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))


def special_coords(size: int, count: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Normalized coordinates on pixel centres (j+0.5)/size, on pixel borders j/size, and exactly 0 and 1."""
    j = torch.arange(size, dtype=dtype)
    pool = torch.cat(
        ((j + 0.5) / size, torch.arange(size + 1, dtype=dtype) / size, torch.tensor([0.0, 1.0], dtype=dtype))
    )
    return pool[torch.randint(len(pool), (count,), generator=gen)]


def make_inputs(
    dtype: torch.dtype,
    *,
    shapes: list[tuple[int, int]] = LEVELS,
    batch: int = 2,
    queries: int = 11,
    heads: int = 2,
    channels: int = 3,
    points: int = 3,
    seed: int = 0,
) -> Inputs:
    """Locations uniform in [-0.2, 1.2] (zero padding), half of them replaced by centres, borders, 0 and 1."""
    N, Lq, M, D, P = batch, queries, heads, channels, points
    gen = torch.Generator().manual_seed(seed)
    spatial, starts = levels(shapes)
    S, L = int((spatial[:, 0] * spatial[:, 1]).sum()), len(shapes)
    value = torch.randn(N, S, M, D, generator=gen, dtype=dtype)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=gen, dtype=dtype) * 1.4 - 0.2
    for lv, (H, W) in enumerate(shapes):
        for axis, size in ((0, W), (1, H)):
            flat = loc[:, :, :, lv, :, axis].reshape(-1)  # a copy: [N*Lq*M*P]
            half = flat.numel() // 2
            flat[:half] = special_coords(size, half, gen, dtype)
            loc[:, :, :, lv, :, axis] = flat.view(N, Lq, M, P)
    weights = torch.rand(N, Lq, M, L, P, generator=gen, dtype=dtype)
    return value, spatial, starts, loc, weights


def outputs_and_grads(
    inputs: Inputs, backend: str, seed: int = 1, upstream: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The output and the gradients w.r.t. value, sampling locations and attention weights (random upstream)."""
    value, spatial, starts, loc, weights = inputs
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn(leaves[0], spatial, starts, leaves[1], leaves[2], backend=backend)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype) if upstream is None else upstream
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def brute_force(
    value: torch.Tensor, shapes: list[tuple[int, int]], loc: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Sample by sample and corner by corner, from the pixel convention x = loc_x * W - 0.5 (zero padding)."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = torch.zeros(N, Lq, M * D, dtype=torch.float64)
    start = 0
    for lv, (H, W) in enumerate(shapes):
        for n in range(N):
            for q in range(Lq):
                for m in range(M):
                    for p in range(P):
                        x = loc[n, q, m, lv, p, 0].item() * W - 0.5
                        y = loc[n, q, m, lv, p, 1].item() * H - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        a = weights[n, q, m, lv, p].item()
                        for yy, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
                                if 0 <= yy < H and 0 <= xx < W:
                                    out[n, q, m * D : (m + 1) * D] += a * wy * wx * value[n, start + yy * W + xx, m]
        start += H * W
    return out


# ---------------------------------------------------------------------------------------------------------------
# Agreement


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_fast_path_matches_the_reference_output_and_gradients(backend: str, dtype: torch.dtype, tol: float) -> None:
    inputs = make_inputs(dtype)
    got = outputs_and_grads(inputs, backend)
    expected = outputs_and_grads(inputs, "reference")
    for name, g, e in zip(("output", "grad value", "grad locations", "grad weights"), got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        err = (g - e).abs().max().item()
        assert err <= tol, f"{backend} {dtype}: {name} differs from the reference by {err:.3g} (> {tol:g})"


def test_head_size_32_matches_the_reference(backend: str) -> None:
    """D = 32 (256 channels / 8 heads) runs a compile-time instance of the C++ loops."""
    inputs = make_inputs(torch.float64, shapes=[(4, 5), (2, 3)], batch=1, queries=5, heads=2, channels=32, seed=2)
    for g, e in zip(outputs_and_grads(inputs, backend), outputs_and_grads(inputs, "reference"), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def kink_inputs(widths: Sequence[int], dtype: torch.dtype) -> Inputs:
    """One level of height 2 per width, one query sampling every pixel centre and border of each (and just outside)
    at y = 0.25; values whose slope along x differs on each side of every pixel centre (``columns**2``)."""
    widths = list(widths)
    shapes = [(2, w) for w in widths]
    spatial, starts = levels(shapes)
    points = 2 * max(widths) + 4
    x = torch.empty(len(shapes), points, dtype=dtype)
    for lv, w in enumerate(widths):
        j = torch.arange(-1, w + 1, dtype=dtype)
        coords = torch.cat(((j + 0.5) / w, j / w))  # centres (also just outside) and borders
        x[lv] = torch.cat((coords, coords[-1:].expand(points - len(coords))))
    loc = torch.stack((x, torch.full_like(x, 0.25)), -1)[None, None, None]  # [1, 1, 1, L, P, 2]
    weights = torch.ones(loc.shape[:-1], dtype=dtype)
    columns = torch.cat([torch.arange(w, dtype=dtype).repeat(2) for w in widths])  # [S] column index of each pixel
    value = (columns**2)[None, :, None, None]  # [1, S, 1, 1]: slope 2j - 1 on the left of j, 2j + 1 on the right
    return value, spatial, starts, loc, weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_pixel_centres_take_the_same_side_of_the_kink_as_the_reference(backend: str, dtype: torch.dtype) -> None:
    """At a pixel centre the derivative w.r.t. the location is one-sided; which side depends on the rounding of
    loc * W - 0.5. Widths 1..64, every centre and border of each, values with a different slope on each side."""
    value, spatial, starts, loc, weights = kink_inputs(range(1, 65), dtype)
    grads = []
    for name in (backend, "reference"):
        leaf = loc.clone().requires_grad_()
        ms_deform_attn(value, spatial, starts, leaf, weights, backend=name).sum().backward()
        grads.append(leaf.grad)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    if backend == "gather":  # d/dy is 0 (the value is constant along y) up to autograd's cancellation error
        torch.testing.assert_close(grads[0][..., 1], grads[1][..., 1], rtol=0, atol=4096 * 4 * torch.finfo(dtype).eps)
        grads = [g[..., 0] for g in grads]  # the kink is along x
    torch.testing.assert_close(grads[0], grads[1], rtol=rtol, atol=0)


def test_every_path_matches_a_brute_force_loop(backend: str) -> None:
    shapes = [(2, 3), (3, 2), (1, 1)]
    value, spatial, starts, loc, weights = make_inputs(
        torch.float64, shapes=shapes, batch=2, queries=3, heads=2, channels=2, points=2, seed=3
    )
    expected = brute_force(value, shapes, loc, weights)
    for name in (backend, "reference"):
        got = ms_deform_attn(value, spatial, starts, loc, weights, backend=name)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"{name} vs the per-sample loop")


@pytest.mark.parametrize(
    "sizes",
    [(1, 1, 1, 1, [(1, 1)], 1), (1, 2, 1, 5, [(1, 2), (3, 1)], 1), (3, 5, 3, 33, [(4, 9), (2, 5)], 2)],
    ids=["all ones", "single row and column maps", "odd sizes"],
)
def test_any_sizes_and_the_inputs_are_left_untouched(backend: str, sizes: tuple) -> None:
    batch, queries, heads, channels, shapes, points = sizes
    inputs = make_inputs(
        torch.float64, shapes=shapes, batch=batch, queries=queries, heads=heads, channels=channels, points=points
    )
    value, spatial, starts, loc, weights = inputs
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn(leaves[0], spatial, starts, leaves[1], leaves[2], backend=backend)
    got = [out.detach(), *torch.autograd.grad(out, leaves, torch.ones_like(out))]
    for leaf, original in zip(leaves, (value, loc, weights), strict=True):
        assert torch.equal(leaf.detach(), original), "an input was modified"
    expected = outputs_and_grads(inputs, "reference", upstream=torch.ones_like(out))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_pure_path_chunks_agree_with_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs(torch.float64, queries=23, seed=4)
    whole = outputs_and_grads(inputs, "torch")
    monkeypatch.setattr(msda_module, "CHUNK_SAMPLES", 50)  # many chunks, ragged last one
    assert len(msda_module._chunks(2 * 23, 2 * 4 * 3)) > 5
    chunked = outputs_and_grads(inputs, "torch")
    expected = outputs_and_grads(inputs, "reference")
    for c, w, e in zip(chunked, whole, expected, strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-10)
        torch.testing.assert_close(c, w, rtol=0, atol=1e-12)


def test_locations_far_outside_and_nan_contribute_nothing(backend: str) -> None:
    value, spatial, starts, loc, weights = make_inputs(torch.float64, seed=5)
    loc[0, 0] = torch.tensor([-3.0, 7.5])  # far outside every map (also in pixels of the finest level)
    loc[0, 1] = float("nan")
    out = ms_deform_attn(value, spatial, starts, loc, weights, backend=backend)
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    torch.testing.assert_close(out[1], ms_deform_attn_reference(value, spatial, starts, loc, weights)[1])


@pytest.mark.parametrize("requested", [(True, False, False), (False, True, False), (False, False, True)])
def test_only_the_requested_gradients_are_computed(backend: str, requested: tuple[bool, bool, bool]) -> None:
    value, spatial, starts, loc, weights = make_inputs(torch.float64, seed=6)
    leaves = [t.clone().requires_grad_(r) for t, r in zip((value, loc, weights), requested, strict=True)]
    out = ms_deform_attn(leaves[0], spatial, starts, leaves[1], leaves[2], backend=backend)
    out.square().sum().backward()
    expected = outputs_and_grads((value, spatial, starts, loc, weights), "reference", upstream=2 * out.detach())
    for leaf, wanted, grad in zip(leaves, requested, expected[1:], strict=True):
        assert (leaf.grad is not None) == wanted
        if wanted:
            torch.testing.assert_close(leaf.grad, grad, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Gradients and determinism


def test_gradcheck(backend: str) -> None:
    """Finite differences, with every sample's pixel coordinate 0.1..0.9 away from the grid (no kinks)."""
    shapes = [(3, 4), (2, 3)]
    gen = torch.Generator().manual_seed(7)
    value, spatial, starts, _, weights = make_inputs(
        torch.float64, shapes=shapes, batch=1, queries=2, heads=2, channels=2, points=2, seed=7
    )
    size = spatial.flip(-1).to(torch.float64)[:, None, :]  # [L, 1, 2] (W, H)
    corner = torch.floor(torch.rand(1, 2, 2, 2, 2, 2, generator=gen, dtype=torch.float64) * (size + 1)) - 1  # -1..W-1
    frac = 0.1 + 0.8 * torch.rand(corner.shape, generator=gen, dtype=torch.float64)
    loc = (corner + frac + 0.5) / size  # some corners outside the map: the zero padding is checked too
    leaves = tuple(t.clone().requires_grad_() for t in (value, loc, weights))

    def fn(v: torch.Tensor, lo: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ms_deform_attn(v, spatial, starts, lo, w, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("heads", [(2, 4), (1, 1)], ids=["per-head tasks", "per-level tasks"])
def test_backward_is_bitwise_deterministic_across_runs_and_thread_counts(
    backend: str, heads: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also across the C++ backward's task split: per head, or per (head, level) when heads < 2 x threads."""
    monkeypatch.setattr(msda_module, "CHUNK_SAMPLES", 4096)  # several pure-path chunks
    shapes = [(12, 14), (6, 7), (3, 4), (2, 2)]
    batch, m = heads
    inputs = make_inputs(torch.float32, shapes=shapes, batch=batch, queries=200, heads=m, channels=8, points=4, seed=8)
    first = outputs_and_grads(inputs, backend)
    second = outputs_and_grads(inputs, backend)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = outputs_and_grads(inputs, backend)
    finally:
        torch.set_num_threads(threads)
    for name, a, b, c in zip(
        ("output", "grad value", "grad locations", "grad weights"), first, second, single, strict=True
    ):
        assert torch.equal(a, b), f"{backend}: {name} differs between two runs"
        assert torch.equal(a, c), f"{backend}: {name} differs between {threads} threads and 1"


@pytest.mark.parametrize("backend", ["torch", "cpp"], indirect=True)  # "gather" is plain autograd: any order
def test_second_derivatives_are_refused(backend: str) -> None:
    value, spatial, starts, loc, weights = make_inputs(torch.float64)
    v = value.clone().requires_grad_()
    out = ms_deform_attn(v, spatial, starts, loc, weights, backend=backend)
    (grad,) = torch.autograd.grad(out.square().sum(), v, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only|once_differentiable"):
        grad.sum().backward()


# ---------------------------------------------------------------------------------------------------------------
# Meta tensors, torch.compile, backend selection


@pytest.mark.parametrize("name", ["auto", "torch", "cpp", "gather", "reference"])
def test_meta_tensors_give_the_output_shape(name: str) -> None:
    if name == "cpp":
        _cpp_or_skip()
    value, spatial, starts, loc, weights = (
        t.to("meta") if t.is_floating_point() else t for t in make_inputs(torch.float32)
    )
    out = ms_deform_attn(value, spatial, starts, loc, weights, backend=name)
    assert out.device.type == "meta" and out.shape == (2, 11, 2 * 3) and out.dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "compiler"),
    [
        ("torch", "aot_eager"),
        ("cpp", "aot_eager"),
        ("auto", "aot_eager"),
        ("gather", "aot_eager"),
        pytest.param("torch", "inductor", marks=pytest.mark.slow),  # ~15 s here with a cold inductor cache
        pytest.param("cpp", "inductor", marks=pytest.mark.slow),
    ],
)
def test_torch_compile_fullgraph_matches_eager(name: str, compiler: str) -> None:
    """Dynamo captures the whole function (fullgraph) and AOTAutograd traces forward and backward."""
    if name == "cpp":
        _cpp_or_skip()
    assert_compiles_like_eager(make_inputs(torch.float32, seed=9), name, compiler)


def assert_compiles_like_eager(inputs: Inputs, backend: str, compiler: str) -> None:
    """``torch.compile(fullgraph=True)`` of the op's squared sum gives eager's value and gradients (1e-5)."""
    value, spatial, starts, loc, weights = inputs

    def step(v: torch.Tensor, lo: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ms_deform_attn(v, spatial, starts, lo, w, backend=backend).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    got = compiled(*leaves)
    grads = torch.autograd.grad(got, leaves)
    expected = step(*leaves)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, torch.autograd.grad(expected, leaves), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    value = torch.zeros(1, 1, 1, 1)
    monkeypatch.setenv(_cpp.DISABLE_ENV, "1")
    assert ms_deform_attn_backend() == "torch"
    with pytest.raises(ShapeError, match="disabled by BLOCKGRAPH_NO_CPP=1"):
        ms_deform_attn(*make_inputs(torch.float32), backend="cpp")
    monkeypatch.delenv(_cpp.DISABLE_ENV)
    assert ms_deform_attn_backend(value.to(torch.float16)) == "torch"
    assert ms_deform_attn_backend(value.to("meta")) == "torch"
    assert ms_deform_attn_backend(value) == ("cpp" if _cpp.load() else "torch")


def test_exporting_picks_the_gather_path() -> None:
    """Under torch.export "auto" becomes "gather": the graph holds only aten ops (no custom op, no grid_sample) and,
    with a symbolic batch, agrees with the reference at another batch size (locations outside the maps included)."""
    chosen = []

    class Core(torch.nn.Module):
        def forward(self, value, spatial, starts, loc, weights):
            chosen.append(ms_deform_attn_backend(value))
            return ms_deform_attn(value, spatial, starts, loc, weights)

    batch = torch.export.Dim("batch", min=1)
    dynamic = ({0: batch}, None, None, {0: batch}, {0: batch})
    program = torch.export.export(Core(), make_inputs(torch.float32, seed=10), dynamic_shapes=dynamic)
    assert chosen == ["gather"] and ms_deform_attn_backend() != "gather"
    ops = {n.target for n in program.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}
    assert {op.namespace for op in ops} == {"aten"}, ops  # (the rest is symbolic size arithmetic)
    names = {op.name() for op in ops}
    assert "aten::index_select" in names and not any("grid_sampler" in n for n in names), names
    inputs = make_inputs(torch.float32, batch=3, seed=11)
    torch.testing.assert_close(program.module()(*inputs), ms_deform_attn_reference(*inputs), rtol=0, atol=1e-5)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv(_cpp.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_cpp, "SOURCES", [broken])
    monkeypatch.setattr(_cpp, "EXTENSION_NAME", "blockgraph_msda_broken")
    monkeypatch.setattr(_cpp, "_loaded", None)
    monkeypatch.setattr(_cpp, "_failure", "")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert not _cpp.load()
    assert "broken.cpp" in _cpp.failure()  # the first compiler error, not ninja's last words
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second attempt is not made, nor reported
        assert ms_deform_attn_backend() == "torch"
        value, spatial, starts, loc, weights = make_inputs(torch.float64)
        torch.testing.assert_close(
            ms_deform_attn(value, spatial, starts, loc, weights),
            ms_deform_attn_reference(value, spatial, starts, loc, weights),
        )
    with pytest.raises(ShapeError, match="C\\+\\+ kernel is unavailable"):
        ms_deform_attn(value, spatial, starts, loc, weights, backend="cpp")


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def _bad(what: str) -> Inputs:
    value, spatial, starts, loc, weights = make_inputs(torch.float32)
    if what == "value rank":
        value = value.flatten(2)
    elif what == "weights shape":
        weights = weights[..., :2]
    elif what == "heads":
        value = value[:, :, :1]
    elif what == "levels":
        spatial = spatial[:3]
    elif what == "dtype":
        loc = loc.double()
    return value, spatial, starts, loc, weights


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("value rank", r"expects value \[N, S, M, D\]"),
        ("weights shape", "do not match"),
        ("heads", "do not match"),
        ("levels", "4 levels in sampling_locations"),
        ("dtype", "share one floating dtype"),
    ],
)
def test_bad_inputs_raise_shape_errors(what: str, message: str) -> None:
    with pytest.raises(ShapeError, match=message):
        ms_deform_attn(*_bad(what), backend="torch")


def test_unknown_backend() -> None:
    with pytest.raises(ShapeError, match="unknown backend"):
        ms_deform_attn(*make_inputs(torch.float32), backend="cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_inputs_are_computed_in_float32(backend: str, dtype: torch.dtype) -> None:
    """bf16 / fp16 inputs (the value and the weights; the locations in float32, as autocast leaves them) give what
    the float32 reference gives on the same (rounded) inputs, up to one rounding of the result to the value's dtype
    (2^-8 relative for bf16, 2^-11 for fp16), and its gradients, each input's in its own dtype. (Against the float64
    reference, the locations' gradient differs where a location lies exactly on a pixel border: which side of the
    bilinear kink is taken depends on the precision of the index arithmetic, float32 here.) The output also agrees
    with the float64 reference to that rounding."""
    value, shapes, starts, loc, weights = make_inputs(torch.float32)  # locations on pixel borders exactly, in fp32
    low = [value.to(dtype).requires_grad_(), loc.requires_grad_(), weights.to(dtype).requires_grad_()]
    out = ms_deform_attn(low[0], shapes, starts, low[1], low[2], backend=backend)
    assert out.dtype == dtype
    wide = [t.detach().float().requires_grad_() for t in low]
    expected = ms_deform_attn_reference(wide[0], shapes, starts, wide[1], wide[2])
    exact = ms_deform_attn_reference(*(t.detach().double() for t in low[:1]), shapes, starts,
                                     *(t.detach().double() for t in low[1:]))  # fmt: skip
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= eps * scale
    assert (out.double() - exact).abs().max().item() <= eps * scale
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad)
    expected.backward(grad.float())
    for got, want in zip(low, wide, strict=True):
        assert got.grad is not None and got.grad.dtype == got.dtype
        tol = (eps if got.dtype == dtype else 1e-5) * want.grad.abs().max().item()
        assert (got.grad.float() - want.grad).abs().max().item() <= tol
