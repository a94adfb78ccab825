"""Multi-scale deformable attention core: the fast paths vs the grid_sample reference, measured in one run.

Deformable-DETR / DINO encoder shape: N=2, levels 80x88 / 40x44 / 20x22 / 10x11 (9350 queries and keys), M=8 heads
x D=32 channels, L=4 levels, P=4 points; float32 on the CPU. Two sampling patterns:

- encoder: each query's reference point is its own pixel centre ((j+0.5)/W, (i+0.5)/H), mapped to every level,
  plus offsets of a few pixels (normal, sigma 2 px) of the target level;
- uniform: sampling locations uniform in [0, 1].

Times are medians of interleaved rounds (bench/timing.py): forward under no_grad, and forward+backward (gradients
w.r.t. value, sampling locations and attention weights). Ratios are variant / reference, lower is better.

Peak extra memory is measured as resident memory: before each call the process returns freed heap memory to the OS
(``malloc_trim``, with glibc's mmap threshold pinned at 64 KiB so that every large tensor is its own mapping and is
unmapped when freed) and resets its high-water mark (``/proc/self/clear_refs`` = 5); the figure is ``VmHWM`` after
the call minus ``VmRSS`` before it: every byte touched during the call (outputs and gradients included), at page
granularity. Linux only; the column reads "n/a" elsewhere. Usage:

    .venv/bin/python bench/deform_attn.py [--rounds 5] [--threads 2] [--cold-build]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from timing import interleaved  # noqa: E402

from blockgraph.ops import (  # noqa: E402
    _msda_cpp,
    ms_deform_attn,
    ms_deform_attn_backend,
    ms_deform_attn_reference,
)

LEVELS = ((80, 88), (40, 44), (20, 22), (10, 11))
N, M, D, P = 2, 8, 32, 4
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_inputs(case: str, *, seed: int = 0) -> Inputs:
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights for one sampling pattern."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS)  # [L, 2] (H, W)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))  # [L]
    keys, levels = int(sizes.sum()), len(LEVELS)  # S and L; the queries are the keys (Lq = S)
    value = torch.randn(N, keys, M, D, generator=gen)
    logits = torch.randn(N, keys, M, levels * P, generator=gen)
    weights = logits.softmax(-1).view(N, keys, M, levels, P)  # softmax jointly over levels and points, per head
    if case == "uniform":
        loc = torch.rand(N, keys, M, levels, P, 2, generator=gen)
    else:
        centres = []
        for h, w in LEVELS:
            y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            centres.append(torch.stack((x.flatten(), y.flatten()), -1))  # [h*w, 2] (x, y)
        ref = torch.cat(centres)  # [S, 2]
        wh = shapes.flip(-1).float()  # [L, 2] (W, H)
        offsets = 2.0 * torch.randn(N, keys, M, levels, P, 2, generator=gen)  # pixels of the target level
        loc = ref[None, :, None, None, None, :] + offsets / wh[:, None, :]  # [N, S, M, L, P, 2]
    return value, shapes, starts, loc, weights


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


def variants(inputs: Inputs) -> dict[str, Callable[..., torch.Tensor]]:
    out: dict[str, Callable[..., torch.Tensor]] = {"reference": ms_deform_attn_reference}
    if ms_deform_attn_backend() == "cpp":
        out["cpp"] = lambda *a: ms_deform_attn(*a, backend="cpp")
    out["torch"] = lambda *a: ms_deform_attn(*a, backend="torch")
    return out


def measure(case: str, rounds: int) -> list[tuple[str, str, float, float, float | None]]:
    value, shapes, starts, loc, weights = make_inputs(case)
    fns = variants((value, shapes, starts, loc, weights))
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    grad_out = torch.randn(N, loc.shape[1], M * D)

    def forward(fn: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn(value, shapes, starts, loc, weights)

        return run

    def train(fn: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            v, lo, w = leaves
            return torch.autograd.grad(fn(v, shapes, starts, lo, w), leaves, grad_out)

        return run

    with torch.no_grad():  # the fast paths agree with the reference on these inputs
        expected = ms_deform_attn_reference(value, shapes, starts, loc, weights)
        for name, fn in fns.items():
            err = (fn(value, shapes, starts, loc, weights) - expected).abs().max().item()
            assert err < 1e-4, f"{case}/{name}: max abs error {err:.3g} vs the reference"

    fwd = interleaved({k: forward(fn) for k, fn in fns.items()}, rounds=rounds)
    both = interleaved({k: train(fn) for k, fn in fns.items()}, rounds=rounds)
    peak = PeakMemory()
    memory = {k: peak(train(fn)) for k, fn in fns.items()}
    return [(case, k, fwd[k], both[k], memory[k]) for k in fns]


def cold_build_seconds() -> float:
    """Build the C++ kernel from scratch (empty TORCH_EXTENSIONS_DIR) in a fresh process; wall-clock seconds."""
    code = (
        "import sys; sys.path.insert(0, '.')\n"
        "from blockgraph.ops import _msda_cpp\n"
        "assert _msda_cpp.load(), _msda_cpp.failure()\n"
        "print(_msda_cpp.load_seconds())\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": tmp}
        env.pop(_msda_cpp.DISABLE_ENV, None)
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True
        )
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cold-build", action="store_true", help="also time a from-scratch build of the kernel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = ms_deform_attn_backend()
    rows = measure("encoder", args.rounds) + measure("uniform", args.rounds)
    keys = sum(h * w for h, w in LEVELS)
    print(
        f"ms_deform_attn, N={N} Lq=S={keys} M={M} D={D} L={len(LEVELS)} P={P}, float32, {args.threads} threads, "
        f"torch {torch.__version__}; auto backend: {backend}"
        + (f" (kernel load {_msda_cpp.load_seconds():.1f} s)" if backend == "cpp" else f" ({_msda_cpp.failure()})")
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


if __name__ == "__main__":
    main()
