"""The reference specs on a GPU (marker ``cuda``: ``pytest -m cuda``; skipped where torch sees no CUDA device).

Every reference spec (depths shrunk to one) is built on the CPU and on the GPU (``device="cuda"``) with the same
weights, moved off their initialization (Deformable-DETR's offsets start exactly on pixel centres, where the bilinear
map has a kink) and with BatchNorm statistics that silence no branch; then, in float32 with TF32 off (so that both
sides compute in float32):

- training mode, forward and backward: every output and every parameter's gradient equals the CPU's within 1e-4 of
  its largest magnitude (the kernels differ: cuBLAS and cuDNN against oneDNN and MKL, the deformable core's
  ``"auto"`` backend against the CPU's C++ kernel);
- eval under ``no_grad``: the eager inference kernels (those the autotuner chooses on the GPU) give the CPU's outputs.

And one spec of each family takes a training step under ``torch.autocast("cuda", dtype=torch.bfloat16)``, as the CPU
does in tests/test_mixed_precision.py: bf16 in every linear layer and convolution, finite gradients, outputs within
bf16 tolerance of float32's, then an AdamW step (tests/support/autocast.py). tests/test_devices.py proves on meta
tensors, without a GPU, that no op takes a CPU-only kernel or a tensor from another device.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_leaves

import blockgraph as bg
from blockgraph.spec.references import SPEC_DIR
from tests.conftest import SPECS
from tests.support.autocast import SPECS as AUTOCAST_SPECS
from tests.support.autocast import check_bf16_training_step
from tests.support.specs import shrunk, small_size
from tests.support.weights import randomize_batchnorm

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]

MATCH = 1e-4
"""Largest difference between the GPU's and the CPU's float32 values, relative to the largest magnitude."""


@pytest.fixture(autouse=True)
def _float32_products() -> Iterator[None]:
    """TF32 off for matrix products and cuDNN's convolutions (on by default for cuDNN): float32 is float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.device.type == "cuda" and got.shape == want.shape and got.dtype == want.dtype, what
    scale = max(want.abs().max().item(), 1e-6)
    diff = (got.cpu() - want).abs().max().item()
    assert diff <= MATCH * scale, f"{what}: max abs diff {diff:.2e}, largest magnitude {scale:.2e}"


def _inputs(model: Any, size: tuple[int, int]) -> list[torch.Tensor]:
    """A batch of two images (on the CPU), and for a mask input (the DINO specs') the bottom rows of the second image
    marked as padding."""
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, model.spec.input.channels, *size, generator=g)]
    for spec in model.spec.input_specs().values():
        if spec.kind == "mask":
            mask = torch.zeros(2, *size, dtype=torch.bool)
            mask[1, size[0] // 2 :] = True
            inputs.append(mask)
    return inputs


def _pair(path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The spec on the CPU and on the GPU with the same weights, off their initialization, drop path and dropout
    off (the two devices draw different random numbers)."""
    variables = bg.analyze(path).spec.variables
    still = {k: 0.0 for k, v in variables.items() if k.startswith("drop") and isinstance(v, int | float)}
    overrides = shrunk(path) | still
    analysis = bg.analyze(path, overrides=overrides)
    outputs = list(analysis.graph.outputs) + list(analysis.graph.features)
    torch.manual_seed(0)
    cpu = bg.build_model(analysis, outputs=outputs)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    randomize_batchnorm(cpu, g)
    gpu = bg.build_model(analysis, outputs=outputs, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_forward_and_backward_on_the_gpu_equal_the_cpus(path: Path) -> None:
    cpu, gpu = _pair(path)
    inputs = _inputs(cpu, small_size(path))
    outs = {}
    for name, model in (("cpu", cpu), ("gpu", gpu)):
        model.train()
        out = model(*(t.to(next(model.parameters()).device) for t in inputs))
        sum(t.float().square().mean() for t in tree_leaves(out)).backward()
        outs[name] = tree_leaves(out)
    for i, (got, want) in enumerate(zip(outs["gpu"], outs["cpu"], strict=True)):
        _assert_close(got.detach(), want.detach(), f"training output {i}")
    grads = dict(cpu.named_parameters())
    for name, p in gpu.named_parameters():
        assert (p.grad is None) == (grads[name].grad is None), name
        if p.grad is not None:
            _assert_close(p.grad, grads[name].grad, f"gradient of {name}")
    for model in (cpu, gpu):
        model.eval()
    with torch.no_grad():  # the eager inference kernels
        want = tree_leaves(cpu(*inputs))
        got = tree_leaves(gpu(*(t.cuda() for t in inputs)))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        _assert_close(g, w, f"eval output {i}")


@pytest.mark.parametrize("name", AUTOCAST_SPECS)
def test_a_bf16_autocast_training_step_on_the_gpu(name: str) -> None:
    torch.manual_seed(0)
    model = bg.build_model(name, overrides=shrunk(SPEC_DIR / f"{name}.yaml"), device="cuda").train()
    check_bf16_training_step(model, torch.randn(2, 3, *model.spec.input.size, device="cuda"))


def test_a_model_moved_to_the_gpu_after_a_cpu_run_equals_one_built_there() -> None:
    """``.to("cuda")`` after the model ran on the CPU (its per-size caches filled there): the same values as the
    model built on the GPU (caches are kept per device)."""
    path = SPEC_DIR / "coat_lite_small_deformable.yaml"
    cpu, gpu = _pair(path)
    inputs = _inputs(cpu, small_size(path))
    cpu.eval()
    gpu.eval()
    with torch.no_grad():
        cpu(*inputs)
        moved = cpu.to("cuda")
        on_gpu = [t.cuda() for t in inputs]
        for got, want in zip(tree_leaves(moved(*on_gpu)), tree_leaves(gpu(*on_gpu)), strict=True):
            _assert_close(got, want.cpu(), "moved model's output")
