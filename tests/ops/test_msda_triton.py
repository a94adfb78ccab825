"""ms_deform_attn's Triton backend (blockgraph/ops/_msda_triton.py) against the float64 grid_sample reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: tests/conftest.py sets ``TRITON_INTERPRET=1``
there before anything imports triton (Triton reads it at import). Where CUDA is available the tests run the
compiled kernels on CUDA tensors instead. The interpreter is slow (numpy, one program at a time): shapes are small.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import pytest
import torch

import blockgraph.ops
from blockgraph.errors import ShapeError
from blockgraph.ops import ms_deform_attn, ms_deform_attn_backend, ms_deform_attn_reference
from tests.conftest import ROOT
from tests.ops.test_ms_deform_attn import Inputs, assert_compiles_like_eager, kink_inputs, make_inputs

msda_module = importlib.import_module("blockgraph.ops.ms_deform_attn")

HAVE_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = "triton is not installed (pip install -e '.[gpu]')"
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)
NAMES = ("output", "grad value", "grad locations", "grad weights")


def kernels() -> ModuleType:
    """blockgraph.ops._msda_triton (imported by the first test that needs it)."""
    return importlib.import_module("blockgraph.ops._msda_triton")


@pytest.fixture(params=["cuda" if torch.cuda.is_available() else "cpu"])
def device(request: pytest.FixtureRequest) -> str:
    """CUDA tensors (compiled kernels) where there is CUDA, else CPU tensors through Triton's interpreter."""
    if not HAVE_TRITON:
        pytest.skip(NO_TRITON)
    if request.param == "cpu" and not kernels().INTERPRETED:
        pytest.skip("no CUDA, and triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    return request.param


def to(inputs: Inputs, device: str) -> Inputs:
    return tuple(t.to(device) for t in inputs)  # type: ignore[return-value]


def outputs_and_grads(inputs: Inputs, backend: str, upstream: torch.Tensor) -> list[torch.Tensor]:
    """The output and the gradients w.r.t. value, sampling locations and attention weights (on the CPU)."""
    value, spatial, starts, loc, weights = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn(leaves[0], spatial, starts, leaves[1], leaves[2], backend=backend)
    grads = torch.autograd.grad(out, leaves, upstream.to(device=out.device, dtype=out.dtype))
    return [t.detach().cpu() for t in (out, *grads)]


def errors(inputs: Inputs, device: str, *, reference: torch.dtype = torch.float64, seed: int = 1) -> dict[str, float]:
    """Max abs difference of the output and each gradient, the kernels run on ``device`` in the inputs' dtype, from
    the grid_sample reference run on the CPU in ``reference`` dtype, relative to the reference's largest magnitude
    (at least 1). Location gradients at a kink (a pixel coordinate, in float64, within 1e-4 of an integer: the
    derivative is one-sided there, and float32 may round to the other side) count only for a reference in the
    inputs' own dtype."""
    value, spatial, starts, loc, weights = inputs
    gen = torch.Generator().manual_seed(seed)
    N, Lq, M = loc.shape[:3]
    upstream = torch.randn(N, Lq, M * value.shape[-1], generator=gen, dtype=torch.float64)
    got = outputs_and_grads(to(inputs, device), "triton", upstream)
    expected = outputs_and_grads(
        tuple(t.to(reference) if t.is_floating_point() else t for t in inputs), "reference", upstream
    )
    pixel = loc.double() * spatial.flip(-1).double()[:, None, :] - 0.5  # [N, Lq, M, L, P, 2]
    kink = ((pixel - pixel.round()).abs() < 1e-4).any(-1, keepdim=True)  # [N, Lq, M, L, P, 1]
    found = {}
    for name, g, e in zip(NAMES, got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == value.dtype, name
        diff = (g.double() - e.double()).abs()
        if name == "grad locations" and reference != loc.dtype:
            diff = diff.masked_fill(kink, 0)
        found[name] = diff.max().item() / max(e.abs().max().item(), 1.0)
    return found


def assert_close(found: dict[str, float], tol: float, what: str) -> None:
    for name, err in found.items():
        assert err <= tol, f"{what}: {name} differs from the reference by {err:.3g} (relative, > {tol:g})"


# ---------------------------------------------------------------------------------------------------------------
# Agreement with the reference


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-13), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
def test_output_and_gradients_match_the_float64_reference(device: str, dtype: torch.dtype, tol: float) -> None:
    """4 non-square levels (one a single row), P=3, M=2, D=3 (not a power of two); locations in [-0.2, 1.2] (zero
    padding), half of them exactly on pixel centres, pixel borders, 0 and 1. In float32 the location gradients
    at pixel centres are compared with the float32 reference (same side of the kink)."""
    inputs = make_inputs(dtype)
    assert_close(errors(inputs, device), tol, f"{device} {dtype} vs float64")
    if dtype == torch.float32:
        assert_close(errors(inputs, device, reference=dtype), 4 * tol, f"{device} {dtype} vs float32")


@pytest.mark.parametrize(
    "sizes",
    [
        (1, 1, 1, 1, [(1, 1)], 1),
        (1, 2, 1, 5, [(1, 2), (3, 1)], 1),
        (1, 5, 2, 32, [(4, 5), (2, 3)], 2),
        (2, 37, 3, 33, [(4, 9), (2, 5)], 2),
    ],
    ids=["all ones", "single row and column maps", "head size 32", "odd sizes, two query blocks"],
)
def test_any_sizes_and_the_inputs_are_left_untouched(device: str, sizes: tuple) -> None:
    batch, queries, heads, channels, shapes, points = sizes
    inputs = make_inputs(
        torch.float64, shapes=shapes, batch=batch, queries=queries, heads=heads, channels=channels, points=points
    )
    copies = [t.clone() for t in inputs]
    assert_close(errors(inputs, device), 1e-13, str(sizes))
    for t, original in zip(inputs, copies, strict=True):
        assert torch.equal(t, original), "an input was modified"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_pixel_centres_take_the_same_side_of_the_kink_as_the_reference(device: str, dtype: torch.dtype) -> None:
    """At a pixel centre the derivative w.r.t. the location is one-sided: the kernels round the pixel coordinate as
    grid_sample does (one fma), so they take the reference's side in its own dtype. Every centre and border of maps
    of several widths, values with a different slope on each side."""
    value, spatial, starts, loc, weights = kink_inputs((1, 2, 3, 5, 7, 10), dtype)
    grads = []
    for name, dev in (("triton", device), ("reference", "cpu")):
        leaf = loc.to(dev, copy=True).requires_grad_()
        ms_deform_attn(value.to(dev), spatial, starts, leaf, weights.to(dev), backend=name).sum().backward()
        grads.append(leaf.grad.cpu())
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(grads[0], grads[1], rtol=rtol, atol=0)


def test_locations_far_outside_and_nan_contribute_nothing(device: str) -> None:
    value, spatial, starts, loc, weights = make_inputs(torch.float64, seed=5)
    loc[0, 0] = torch.tensor([-3.0, 7.5])  # far outside every map
    loc[0, 1] = float("nan")
    leaves = [t.to(device, copy=True).requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn(leaves[0], spatial, starts, leaves[1], leaves[2], backend="triton")
    out[0, :2].sum().backward()
    assert torch.equal(out[0, :2].detach().cpu(), torch.zeros(2, out.shape[-1], dtype=out.dtype))
    assert not leaves[0].grad.any() and not leaves[1].grad.any() and not leaves[2].grad.any()
    torch.testing.assert_close(out[1].detach().cpu(), ms_deform_attn_reference(value, spatial, starts, loc, weights)[1])


@pytest.mark.parametrize("requested", [(True, False, False), (False, True, False), (False, False, True)])
def test_only_the_requested_gradients_are_computed(device: str, requested: tuple[bool, bool, bool]) -> None:
    value, spatial, starts, loc, weights = make_inputs(torch.float64, shapes=[(3, 4), (2, 3)], seed=6)
    leaves = [t.to(device, copy=True).requires_grad_(r) for t, r in zip((value, loc, weights), requested, strict=True)]
    out = ms_deform_attn(leaves[0], spatial, starts, leaves[1], leaves[2], backend="triton")
    out.square().sum().backward()
    reference = [t.clone().requires_grad_() for t in (value, loc, weights)]
    ms_deform_attn_reference(reference[0], spatial, starts, reference[1], reference[2]).square().sum().backward()
    for leaf, wanted, expected in zip(leaves, requested, reference, strict=True):
        assert (leaf.grad is not None) == wanted
        if wanted:
            torch.testing.assert_close(leaf.grad.cpu(), expected.grad, rtol=0, atol=1e-10)


def test_gradcheck(device: str) -> None:
    """Finite differences (gradcheck's fast mode: random projections), float64, every sample's pixel coordinate
    0.1..0.9 away from the grid (no kinks), some corners outside the map."""
    shapes = [(3, 4), (2, 3)]
    gen = torch.Generator().manual_seed(7)
    value, spatial, starts, _, weights = make_inputs(
        torch.float64, shapes=shapes, batch=1, queries=2, heads=2, channels=2, points=2, seed=7
    )
    size = spatial.flip(-1).to(torch.float64)[:, None, :]  # [L, 1, 2] (W, H)
    corner = torch.floor(torch.rand(1, 2, 2, 2, 2, 2, generator=gen, dtype=torch.float64) * (size + 1)) - 1
    frac = 0.1 + 0.8 * torch.rand(corner.shape, generator=gen, dtype=torch.float64)
    loc = (corner + frac + 0.5) / size
    leaves = tuple(t.to(device, copy=True).requires_grad_() for t in (value, loc, weights))

    def fn(v: torch.Tensor, lo: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ms_deform_attn(v, spatial, starts, lo, w, backend="triton")

    # (nondet_tol: on a GPU the atomic value gradient may differ in its last bits between two backward passes)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, nondet_tol=1e-12, fast_mode=True)


def test_second_derivatives_are_refused(device: str) -> None:
    value, spatial, starts, loc, weights = to(make_inputs(torch.float64, shapes=[(2, 3)]), device)
    v = value.clone().requires_grad_()
    out = ms_deform_attn(v, spatial, starts, loc, weights, backend="triton")
    (grad,) = torch.autograd.grad(out.square().sum(), v, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        grad.sum().backward()


# ---------------------------------------------------------------------------------------------------------------
# Reduced precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loc_dtype", ["float32", "reduced"], ids=["autocast-like", "all reduced"])
def test_reduced_precision_is_taken_as_is_and_computed_in_float32(
    device: str, dtype: torch.dtype, loc_dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernels get the reduced tensors themselves (no float32 copies) and give what the float32 reference gives
    on the same (rounded) inputs, up to one rounding of each result to its dtype, each gradient in its input's
    dtype; the output also agrees with the float64 reference to that rounding. (bf16 in the interpreter: one
    bf16 step, as its casts truncate.)"""
    seen = []
    module = kernels()
    forward = module.ms_deform_attn
    monkeypatch.setattr(module, "ms_deform_attn", lambda *a: seen.append([t.dtype for t in a]) or forward(*a))
    value, shapes, starts, loc, weights = make_inputs(torch.float32, shapes=[(5, 7), (3, 4), (1, 3)])
    low = [value.to(dtype), loc if loc_dtype == "float32" else loc.to(dtype), weights.to(dtype)]
    leaves = [t.to(device, copy=True).requires_grad_() for t in low]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend="triton")
    assert seen == [[t.dtype for t in (low[0], shapes, starts, low[1], low[2])]]
    assert out.dtype == dtype
    wide = [t.float().clone().requires_grad_() for t in low]
    expected = ms_deform_attn_reference(wide[0], shapes, starts, wide[1], wide[2])
    exact = ms_deform_attn_reference(low[0].double(), shapes, starts, low[1].double(), low[2].double())
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    if device == "cpu" and dtype == torch.bfloat16:
        eps *= 2  # Triton's interpreter casts float32 to bfloat16 by truncation (the GPU rounds to nearest)
    scale = expected.abs().max().item()
    assert (out.detach().cpu().float() - expected).abs().max().item() <= eps * scale
    assert (out.detach().cpu().double() - exact).abs().max().item() <= eps * scale
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad.to(device))
    expected.backward(grad.float())
    for got, want in zip(leaves, wide, strict=True):
        assert got.grad is not None and got.grad.dtype == got.dtype
        tol = (eps if got.dtype == dtype else 1e-5) * want.grad.abs().max().item()
        assert (got.grad.cpu().float() - want.grad).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------------------------
# Deterministic value gradient


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch.use_deterministic_algorithms(True) inside (the previous setting restored after)."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


def test_deterministic_value_gradient_is_bitwise_repeatable_and_equals_the_atomic_one(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torch.use_deterministic_algorithms(True) the value gradient sums each row's contributions in sample
    order (sort + one program per row) instead of atomics: two runs agree bit for bit, and with the atomic path and
    the reference to rounding. Small maps and many queries: each value row gets many contributions."""
    module = kernels()
    inputs = make_inputs(torch.float32, shapes=[(3, 4), (2, 2)], batch=1, queries=40, heads=2, channels=5, seed=8)
    upstream = torch.randn(1, 40, 2 * 5, generator=torch.Generator().manual_seed(9))
    atomic = outputs_and_grads(to(inputs, device), "triton", upstream)
    calls = []
    sum_sorted = module._sum_sorted
    monkeypatch.setattr(module, "_sum_sorted", lambda *a: calls.append(1) or sum_sorted(*a))
    with deterministic_algorithms():
        first = outputs_and_grads(to(inputs, device), "triton", upstream)
        second = outputs_and_grads(to(inputs, device), "triton", upstream)
    assert len(calls) == 2, "the deterministic path was not taken"
    assert not atomic[1].isnan().any()
    for name, a, b, c in zip(NAMES, first, second, atomic, strict=True):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5 * c.abs().max().item(), msg=name)
    reference = outputs_and_grads(tuple(t.double() if t.is_floating_point() else t for t in inputs), "reference",
                                  upstream.double())  # fmt: skip
    err = (first[1].double() - reference[1]).abs().max().item()
    assert err <= 2e-6 * reference[1].abs().max().item(), err


# ---------------------------------------------------------------------------------------------------------------
# Selection, meta tensors, torch.compile, errors


def test_auto_picks_triton_for_cuda_tensors_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # (no CUDA needed to ask)
    monkeypatch.setattr(msda_module, "_triton_available", lambda: True)
    monkeypatch.setattr(msda_module, "_cpp_available", lambda: True)
    assert ms_deform_attn_backend(cuda) == "triton"
    assert ms_deform_attn_backend(SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)) == "triton"
    assert ms_deform_attn_backend(torch.zeros(1)) == "cpp"  # the CPU keeps the C++ kernel
    assert ms_deform_attn_backend(torch.zeros(1, device="meta")) == "torch"
    monkeypatch.setattr(msda_module, "_triton_available", lambda: False)
    assert ms_deform_attn_backend(cuda) == "torch"


@needs_triton
def test_a_cpu_tensor_without_the_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels(), "INTERPRETED", False)  # as where triton was imported without TRITON_INTERPRET=1
    with pytest.raises(ShapeError, match="imported without TRITON_INTERPRET=1") as caught:
        ms_deform_attn(*make_inputs(torch.float32), backend="triton")
    assert "TRITON_INTERPRET=1" in caught.value.hint and 'backend="auto"' in caught.value.hint
    value, spatial, starts, loc, weights = make_inputs(torch.float32)
    with pytest.raises(ShapeError, match="imported without TRITON_INTERPRET=1"):  # reduced precision: same check
        ms_deform_attn(value.bfloat16(), spatial, starts, loc, weights, backend="triton")


def test_without_triton_the_backend_is_refused_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if triton were not installed: a clear error with the install hint; "auto" keeps its CPU/torch paths."""
    monkeypatch.setattr(msda_module, "_triton", None)
    monkeypatch.setattr(msda_module, "_triton_failure", "")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "blockgraph.ops._msda_triton", raising=False)
    monkeypatch.delattr(blockgraph.ops, "_msda_triton", raising=False)
    with pytest.raises(ShapeError, match="Triton kernels are unavailable.*triton") as caught:
        ms_deform_attn(*make_inputs(torch.float32), backend="triton")
    assert "blockgraph[gpu]" in caught.value.hint
    assert ms_deform_attn_backend(SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)) == "torch"


def test_unknown_backend_names_the_triton_one() -> None:
    with pytest.raises(ShapeError, match="unknown backend") as caught:
        ms_deform_attn(*make_inputs(torch.float32), backend="cuda")  # type: ignore[arg-type]
    assert "'triton'" in caught.value.hint


@needs_triton
def test_meta_tensors_give_the_output_shape() -> None:
    value, spatial, starts, loc, weights = (t.to("meta") for t in make_inputs(torch.float32))
    out = ms_deform_attn(value, spatial, starts, loc, weights, backend="triton")
    assert out.device.type == "meta" and out.shape == (2, 11, 2 * 3) and out.dtype == torch.float32


def test_torch_compile_fullgraph_matches_eager(device: str) -> None:
    """Dynamo captures the op whole (fullgraph) and AOTAutograd traces its registered backward (fake kernels)."""
    inputs = to(make_inputs(torch.float32, shapes=[(3, 4), (2, 3)], seed=9), device)
    assert_compiles_like_eager(inputs, "triton", "aot_eager")


_COMPILE_FOR_A_GPU = """
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
from blockgraph.ops import _msda_triton as module, ms_deform_attn
from tests.ops.test_ms_deform_attn import make_inputs

assert not module.INTERPRETED
launches = []


class Record:  # stands in for a kernel: records each launch's arguments, runs nothing
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))


for name in ("_forward_kernel", "_backward_kernel", "_sum_rows_kernel"):
    setattr(module, name, Record(getattr(module, name)))
module.unusable = lambda device: None  # (CPU tensors: their launches are recorded, not run)
for value_dtype, loc_dtype, deterministic in [
    (torch.float32, torch.float32, False), (torch.float32, torch.float32, True),
    (torch.bfloat16, torch.float32, False), (torch.float64, torch.float64, True),
]:
    value, spatial, starts, loc, weights = make_inputs(torch.float32, shapes=[(3, 4), (2, 3)], channels=32)
    leaves = [value.to(value_dtype), loc.to(loc_dtype), weights.to(value_dtype)]
    leaves = [t.requires_grad_() for t in leaves]
    torch.use_deterministic_algorithms(deterministic)
    out = ms_deform_attn(leaves[0], spatial, starts, leaves[1], leaves[2], backend="triton")
    torch.autograd.grad(out, leaves, torch.ones_like(out))
seen = set()
for kernel, args, kwargs in launches:
    bound = {p.name: a for p, a in zip(kernel.params, args)} | kwargs
    signature = {p.name: "constexpr" if p.is_constexpr else mangle_type(bound[p.name]) for p in kernel.params}
    constants = {p.name: bound[p.name] for p in kernel.params if signature[p.name] == "constexpr"}
    key = (kernel.__name__, tuple(signature.values()), tuple(map(str, constants.values())))
    if key in seen:
        continue
    seen.add(key)
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], key
    print(kernel.__name__, signature[next(iter(signature))], constants.get("GRAD_VALUE"), flush=True)
"""


@needs_triton
def test_the_kernels_compile_for_a_gpu_without_one(tmp_path: pathlib.Path) -> None:
    """What the interpreter does not check: Triton compiles each kernel, as the ops launch it (their arguments
    recorded on CPU tensors: float32, bf16 with float32 locations, float64; atomic and deterministic backward),
    down to a cubin for sm_90 with its bundled LLVM and ptxas. No GPU is needed to compile."""
    if not (pathlib.Path(importlib.util.find_spec("triton").origin).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1", "BLOCKGRAPH_NO_CPP": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_A_GPU], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = done.stdout.split("\n")
    assert sum(line.startswith("_forward_kernel") for line in compiled) == 3, done.stdout
    assert sum(line.startswith("_backward_kernel") for line in compiled) == 4, done.stdout
    assert sum(line.startswith("_sum_rows_kernel") for line in compiled) == 2, done.stdout


def test_importing_blockgraph_does_not_import_the_triton_backend() -> None:
    """Nor does choosing a backend for CPU tensors. (torch itself imports triton, with torch._dynamo.)"""
    code = (
        "import sys, torch, blockgraph, blockgraph.ops\n"
        "assert blockgraph.ops.ms_deform_attn_backend(torch.zeros(1)) == 'torch'\n"
        "assert 'blockgraph.ops._msda_triton' not in sys.modules\n"
    )
    env = {**os.environ, "BLOCKGRAPH_NO_CPP": "1"}  # (no C++ build in this process)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
