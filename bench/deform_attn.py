"""Multi-scale deformable attention core: the fast paths vs the grid_sample reference, measured in one run.

Deformable-DETR / DINO encoder shape: N=2 (``--batch``; 8 on CUDA), levels 80x88 / 40x44 / 20x22 / 10x11 (9350
queries and keys), M=8 heads x D=32 channels, L=4 levels, P=4 points; float32, on the CPU or (``--device cuda``) a
CUDA device. Two sampling patterns:

- encoder: each query's reference point is its own pixel centre ((j+0.5)/W, (i+0.5)/H), mapped to every level,
  plus offsets of a few pixels (normal, sigma 2 px) of the target level;
- uniform: sampling locations uniform in [0, 1].

Times are medians of interleaved rounds (bench/timing.py): forward under no_grad, and forward+backward (gradients
w.r.t. value, sampling locations and attention weights). Ratios are variant / reference, lower is better. The
variants (``--backends``): the reference (grid_sample) and, by default, on the CPU the C++ kernel (where it builds)
and the pure-PyTorch gather; on CUDA the Triton kernels (atomic value gradient), the Triton kernels under
``torch.use_deterministic_algorithms(True)`` ("triton-deterministic": sorted, atomic-free value gradient), and the
pure-PyTorch gather.

On CUDA every timed call ends with ``torch.cuda.synchronize()``, and the peak extra memory is
``torch.cuda.max_memory_allocated()`` during the call minus the memory allocated before it (outputs and gradients
included; the caching allocator's reserve is not counted). On the CPU it is measured as resident memory: before each call the process returns freed heap memory to the OS
(``malloc_trim``, with glibc's mmap threshold pinned at 64 KiB so that every large tensor is its own mapping and is
unmapped when freed) and resets its high-water mark (``/proc/self/clear_refs`` = 5); the figure is ``VmHWM`` after
the call minus ``VmRSS`` before it: every byte touched during the call (outputs and gradients included), at page
granularity. Linux only; the column reads "n/a" elsewhere. Usage:

    .venv/bin/python bench/deform_attn.py [--rounds 5] [--threads 2] [--cold-build]
    .venv/bin/python bench/deform_attn.py --device cuda [--batch 8] [--backends reference,triton,torch]

``--device cuda`` without a CUDA device, or a Triton variant without triton, exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from timing import interleaved  # noqa: E402

from blockgraph.ops import (  # noqa: E402
    _cpp,
    ms_deform_attn,
    ms_deform_attn_backend,
    ms_deform_attn_reference,
)

LEVELS = ((80, 88), (40, 44), (20, 22), (10, 11))
N, M, D, P = 2, 8, 32, 4
CUDA_BATCH = 8
"""The batch on CUDA (DINO's training batch; the CPU keeps N)."""
BACKENDS = ("reference", "cpp", "triton", "triton-deterministic", "torch")
"""Variants ``--backends`` may name: "triton-deterministic" runs the Triton kernels under
``torch.use_deterministic_algorithms(True)``."""
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class RefusedError(Exception):
    """The run cannot be done here (no CUDA, no triton, a variant for the other device): exit status 2."""


def make_inputs(case: str, *, seed: int = 0, batch: int = N, device: str = "cpu") -> Inputs:
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights for one sampling pattern
    (drawn on the CPU, the same for every device, then moved to ``device``)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS)  # [L, 2] (H, W)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))  # [L]
    keys, levels = int(sizes.sum()), len(LEVELS)  # S and L; the queries are the keys (Lq = S)
    value = torch.randn(batch, keys, M, D, generator=gen)
    logits = torch.randn(batch, keys, M, levels * P, generator=gen)
    weights = logits.softmax(-1).view(batch, keys, M, levels, P)  # softmax jointly over levels and points, per head
    if case == "uniform":
        loc = torch.rand(batch, keys, M, levels, P, 2, generator=gen)
    else:
        centres = []
        for h, w in LEVELS:
            y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            centres.append(torch.stack((x.flatten(), y.flatten()), -1))  # [h*w, 2] (x, y)
        ref = torch.cat(centres)  # [S, 2]
        wh = shapes.flip(-1).float()  # [L, 2] (W, H)
        offsets = 2.0 * torch.randn(batch, keys, M, levels, P, 2, generator=gen)  # pixels of the target level
        loc = ref[None, :, None, None, None, :] + offsets / wh[:, None, :]  # [N, S, M, L, P, 2]
    return tuple(t.to(device) for t in (value, shapes, starts, loc, weights))  # type: ignore[return-value]


class PeakMemory:
    """Peak extra resident memory of a call (see the module docstring); ``None`` where unsupported."""

    def __init__(self) -> None:
        self.libc = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: fixed, so big blocks are unmapped when freed
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.libc = libc
            except OSError:
                self.libc = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __call__(self, fn: Callable[[], object], repeat: int = 3) -> float | None:
        if self.libc is None:
            return None
        peaks = []
        for _ in range(repeat):
            self.libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = self._status("VmRSS:")
            fn()
            peaks.append(self._status("VmHWM:") - before)
        return min(peaks) / 1e6


class CudaPeakMemory:
    """Peak extra CUDA memory of a call: ``max_memory_allocated`` during it minus what was allocated before, MB."""

    def __call__(self, fn: Callable[[], object], repeat: int = 3) -> float:
        peaks = []
        for _ in range(repeat):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
        return min(peaks) / 1e6


def default_backends(device: str) -> list[str]:
    """The variants measured when ``--backends`` is not given."""
    if device == "cuda":
        return ["reference", "triton", "triton-deterministic", "torch"]
    return ["reference", "cpp", "torch"] if ms_deform_attn_backend() == "cpp" else ["reference", "torch"]


def check_backends(names: list[str], device: str) -> None:
    """Raises :class:`RefusedError` for a variant that cannot run on ``device`` here."""
    for name in names:
        if name.startswith("triton"):
            if device != "cuda":
                raise RefusedError(f"{name} runs on CUDA tensors: add --device cuda")
            if ms_deform_attn_backend(torch.empty(0, device="cuda")) != "triton":
                raise RefusedError(f"{name}: triton does not import (pip install -e '.[gpu]')")
        if name == "cpp" and (device != "cpu" or ms_deform_attn_backend() != "cpp"):
            raise RefusedError(f"cpp runs on the CPU, where the C++ kernel builds ({_cpp.failure() or device})")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside when ``enabled`` (the previous setting restored)."""
    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def variants(names: list[str]) -> dict[str, tuple[Callable[..., torch.Tensor], bool]]:
    """Each variant's function and whether it runs under deterministic algorithms."""
    out: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {}
    for name in names:
        if name == "reference":
            out[name] = (ms_deform_attn_reference, False)
        else:
            backend = name.removesuffix("-deterministic")
            out[name] = (lambda *a, backend=backend: ms_deform_attn(*a, backend=backend), name != backend)
    return out


def measure(
    case: str, rounds: int, names: list[str], *, device: str = "cpu", batch: int = N
) -> list[tuple[str, str, float, float, float | None]]:
    value, shapes, starts, loc, weights = make_inputs(case, batch=batch, device=device)
    fns = variants(names)
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    grad_out = torch.randn(batch, loc.shape[1], M * D, device=device)
    cuda = device == "cuda"

    def forward(fn: Callable[..., torch.Tensor], deterministic: bool) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad(), deterministic_algorithms(deterministic):
                out = fn(value, shapes, starts, loc, weights)
            if cuda:
                torch.cuda.synchronize()
            return out

        return run

    def train(fn: Callable[..., torch.Tensor], deterministic: bool) -> Callable[[], object]:
        def run() -> object:
            v, lo, w = leaves
            with deterministic_algorithms(deterministic):
                grads = torch.autograd.grad(fn(v, shapes, starts, lo, w), leaves, grad_out)
            if cuda:
                torch.cuda.synchronize()
            return grads

        return run

    with torch.no_grad():  # the fast paths agree with the reference on these inputs
        expected = ms_deform_attn_reference(value, shapes, starts, loc, weights)
        for name, (fn, deterministic) in fns.items():
            with deterministic_algorithms(deterministic):
                err = (fn(value, shapes, starts, loc, weights) - expected).abs().max().item()
            assert err < 1e-4, f"{case}/{name}: max abs error {err:.3g} vs the reference"

    fwd = interleaved({k: forward(*v) for k, v in fns.items()}, rounds=rounds)
    both = interleaved({k: train(*v) for k, v in fns.items()}, rounds=rounds)
    peak = CudaPeakMemory() if cuda else PeakMemory()
    memory = {k: peak(train(*v)) for k, v in fns.items()}
    return [(case, k, fwd[k], both[k], memory[k]) for k in fns]


def cold_build_seconds() -> float:
    """Build the C++ kernel from scratch (empty TORCH_EXTENSIONS_DIR) in a fresh process; wall-clock seconds."""
    code = (
        "import sys; sys.path.insert(0, '.')\n"
        "from blockgraph.ops import _cpp\n"
        "assert _cpp.load(), _cpp.failure()\n"
        "print(_cpp.load_seconds())\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": tmp}
        env.pop(_cpp.DISABLE_ENV, None)
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True
        )
    return float(done.stdout.split()[-1])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cold-build", action="store_true", help="also time a from-scratch build of the kernel")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=None, help=f"N (default: {N} on the CPU, {CUDA_BATCH} on CUDA)")
    parser.add_argument(
        "--backends",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        help=f"comma-separated variants among {', '.join(BACKENDS)} (the reference is always measured: the ratios "
        "are against it); default: every fast path of the device",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.backends or ()) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; choose among {', '.join(BACKENDS)}")
    if args.batch is None:
        args.batch = CUDA_BATCH if args.device == "cuda" else N
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise RefusedError(
                f"--device cuda: no CUDA device here (torch {torch.__version__}, CUDA {torch.version.cuda})"
            )
        names = ["reference"] + [n for n in args.backends or default_backends(args.device) if n != "reference"]
        check_backends(names, args.device)
    except RefusedError as e:
        print(f"bench/deform_attn.py: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cases = [measure(c, args.rounds, names, device=args.device, batch=args.batch) for c in ("encoder", "uniform")]
    rows = cases[0] + cases[1]
    keys = sum(h * w for h, w in LEVELS)
    if args.device == "cuda":
        backend = ms_deform_attn_backend(torch.empty(0, device="cuda"))
        print(
            f"ms_deform_attn, N={args.batch} Lq=S={keys} M={M} D={D} L={len(LEVELS)} P={P}, float32, "
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}; auto backend: {backend}"
        )
        print("peak extra memory (MB = 1e6 bytes): torch.cuda.max_memory_allocated during fwd+bwd minus the allocated")
    else:
        backend = ms_deform_attn_backend()
        print(
            f"ms_deform_attn, N={args.batch} Lq=S={keys} M={M} D={D} L={len(LEVELS)} P={P}, float32, "
            f"{args.threads} threads, torch {torch.__version__}; auto backend: {backend}"
            + (f" (kernel load {_cpp.load_seconds():.1f} s)" if backend == "cpp" else f" ({_cpp.failure()})")
        )
        print("peak extra memory (MB = 1e6 bytes): resident-set high-water mark during fwd+bwd minus the resident set")
    print()
    print("| case | variant | fwd ms | fwd ratio | fwd+bwd ms | ratio | peak extra MB | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    reference = {case: (f, b, m) for case, k, f, b, m in rows if k == "reference"}
    for case, name, f, b, m in rows:
        rf, rb, rm = reference[case]
        mem = "n/a" if m is None else f"{m:.0f}"
        mem_ratio = "n/a" if m is None or not rm else f"{m / rm:.3f}"
        print(
            f"| {case} | {name} | {f * 1e3:.1f} | {f / rf:.3f} | {b * 1e3:.1f} | {b / rb:.3f} | {mem} | {mem_ratio} |"
        )
    if args.cold_build:
        print()
        print(f"cold build of the C++ kernel (empty extensions dir): {cold_build_seconds():.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
