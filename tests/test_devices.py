"""Nothing assumes the CPU, proven on a machine without a GPU: the meta device stands in for any device but the CPU.

Each op picks its kernel from its input's device (``device.type == "cpu"``: oneDNN, the C++ deformable kernel, the
channels-last folded Conv-BN weight), so on meta tensors it takes exactly the path it takes on a GPU; only the eager
inference kernels are kept off meta in use (``kernel.PLAIN_DEVICES``: nothing to gain where nothing is computed), and
the tests here allow them, as on an accelerator. A dispatch mode (:class:`DeviceAudit`) sees every op the model runs
below autograd: none may be a kernel only the CPU has, and none may take or make a tensor on another device than the
model's (a tensor made without ``device=``, a cache filled by an earlier run on the CPU).

Every reference spec (depths shrunk to one), built on the CPU and run there once (its per-size caches filled), then
moved with ``.to("meta")``: in eval under ``no_grad`` (the eager inference kernels) and in training with a backward
pass, every node's output has the shape blockgraph inferred statically, and every parameter gets a gradient of its
shape on the device. ``tests/test_cuda.py`` runs the same models on a real GPU against the CPU's values.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import blockgraph as bg
from blockgraph.ops import autotune, kernel
from blockgraph.ops.coat import factor_attention
from blockgraph.ops.conv import conv_bn
from blockgraph.ops.linear import linear
from tests.conftest import ROOT, SPECS
from tests.support.specs import runtime_shapes, shrunk, small_size, static_shapes

CPU_ONLY = (
    "mkldnn::",
    "blockgraph_msda::",
    "blockgraph::linear_inference",
    "blockgraph::conv2d_inference",
    "blockgraph::linear_training",
    "blockgraph::linear_grad_",
)
"""Ops with kernels on the CPU only: oneDNN's (the linear and convolution ops' fused and training kernels, and our
compiled-graph ops over them) and the C++ deformable attention's."""


class DeviceAudit(TorchDispatchMode):
    """Records, while active, every op run (``ops``: ``aten::relu_``, ``aten::add_.Tensor``), those that run a
    kernel only the CPU has (``cpu_only``, :data:`CPU_ONLY`) and those that take or return a tensor on another device
    than ``device`` (``foreign``)."""

    def __init__(self, device: str | torch.device) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.ops: Counter[str] = Counter()
        self.cpu_only: Counter[str] = Counter()
        self.foreign: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.name()
        self.ops[name] += 1
        if name.startswith(CPU_ONLY):
            self.cpu_only[name] += 1
        if any(isinstance(t, torch.Tensor) and t.device != self.device for t in tree_leaves((args, kwargs, out))):
            self.foreign[name] += 1
        return out


@pytest.fixture
def kernels_on_meta(monkeypatch) -> None:
    """The eager inference kernels allowed on the meta device, as on an accelerator."""
    monkeypatch.setattr(kernel, "PLAIN_DEVICES", frozenset())


SWIN = ROOT / "specs" / "swin_tiny_patch4_window7_224.yaml"
CASES = [pytest.param(path, {}, None, id=path.stem) for path in SPECS] + [
    # Swin with two blocks per stage (shrunk, it has no shifted block): the shift mask made at build (a buffer), and
    # with padded windows at another size, the masks made per size and device
    pytest.param(SWIN, {"depths": [2, 2, 2, 2]}, None, id="swin_shifted"),
    pytest.param(SWIN, {"depths": [2, 2, 2, 2], "pad": True}, (100, 164), id="swin_shifted_padded"),
]
"""(spec, overrides, input size or None for the smallest accepted of at least 64 per side)."""


@pytest.mark.parametrize(("path", "overrides", "size"), CASES)
def test_every_spec_runs_off_the_cpu(
    path: Path, overrides: dict[str, Any], size: tuple[int, int] | None, kernels_on_meta: None
) -> None:
    size = size or small_size(path)
    analysis = bg.analyze(path)
    outputs = list(analysis.graph.outputs) + list(analysis.graph.features)
    torch.manual_seed(0)
    model = bg.build_model(path, overrides=shrunk(path) | overrides, outputs=outputs).eval()
    with torch.no_grad(), autotune.tuning(False):  # the CPU run fills the per-size caches (layouts, masks, biases)
        model(*_inputs(model, size, "cpu"))
    model.to("meta")
    inputs = _inputs(model, size, "meta")
    expected = static_shapes(model, size, batch=2)
    audit = DeviceAudit("meta")
    with audit, torch.no_grad():  # eval: the eager inference kernels
        seen, out = runtime_shapes(model, lambda: model(*inputs))
    assert seen == expected
    assert all(t.device.type == "meta" for t in tree_leaves(out))
    model.train()
    with audit:  # training: the references, and autograd's backward
        seen, out = runtime_shapes(model, lambda: model(*inputs))
        sum(t.float().square().mean() for t in tree_leaves(out)).backward()
    # (in training DeiT's distilled head returns both logits, as timm's does: each of the static shape)
    assert {n: set(shapes) for n, shapes in seen.items()} == {n: set(shapes) for n, shapes in expected.items()}
    grads = {n: (p.grad.device, tuple(p.grad.shape)) for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n: (p.device, tuple(p.shape)) for n, p in model.named_parameters()}
    assert not audit.cpu_only
    assert not audit.foreign, dict(audit.foreign)


def _inputs(model: Any, size: tuple[int, int], device: str) -> list[torch.Tensor]:
    """A batch of two images on ``device``, and a padding mask for each mask input (the DINO specs')."""
    image = torch.randn(2, model.spec.input.channels, *size).to(device)
    masks = [torch.zeros(2, *size, dtype=torch.bool, device=device) for i in model.spec.input_specs().values()
             if i.kind == "mask"]  # fmt: skip
    return [image, *masks]


# The three ops that choose kernels, alone: on a device other than the CPU each takes its device-generic eager
# inference path (not only the reference), and never a CPU-only kernel.


def test_the_linear_op_runs_no_onednn_kernel_off_the_cpu(kernels_on_meta: None) -> None:
    """Where the CPU may run oneDNN's fused kernels (eager inference) or its training kernel (autograd recording),
    each forced here, another device runs the plain ones: in eager inference F.linear with the activation and the
    add in place, in training F.linear."""
    layer = nn.Linear(24, 40, device="meta")
    x, residual = torch.empty(2, 9, 24, device="meta"), torch.empty(2, 9, 40, device="meta")
    for forced in ("fused", "plain"):
        inference, training = DeviceAudit("meta"), DeviceAudit("meta")
        with inference, autotune.forcing(forced), torch.no_grad():
            y = linear(x, layer.weight, layer.bias, act=nn.ReLU())
            z = linear(x, layer.weight, layer.bias, residual=residual)
        assert y.shape == z.shape == (2, 9, 40) and y.device.type == "meta"
        assert {"aten::relu_", "aten::add_.Tensor"} <= set(inference.ops)  # the eager inference kernel, in place
        with training, autotune.forcing(forced):
            linear(x.requires_grad_(), layer.weight, layer.bias, act=nn.ReLU()).sum().backward()
        x = x.detach()
        assert "aten::relu_" not in training.ops and layer.weight.grad.shape == (40, 24)
        for audit in (inference, training):
            assert not audit.cpu_only and not audit.foreign


def test_coat_attention_takes_its_fused_kernel_off_the_cpu_with_the_choice_kept_per_device(
    kernels_on_meta: None, monkeypatch
) -> None:
    """CoaT's factorized attention asks the autotuner for the device of its input: on meta (as on a GPU) the fused
    kernel runs (the default, unmeasured on meta), whatever the CPU chose for the same shape."""
    devices: list[torch.device] = []
    choose = autotune.choose

    def spy(key: tuple, candidates: dict, *, device: torch.device, **kwargs) -> str:
        devices.append(device)
        return choose(key, candidates, device=device, **kwargs)

    monkeypatch.setattr(autotune, "choose", spy)  # (run_chosen asks it)
    q, k, conv_v = torch.randn(2, 5, 2, 4), torch.randn(2, 5, 2, 4), torch.randn(2, 4, 2, 4)
    autotune.reset()
    with torch.no_grad():
        factor_attention(q, k, k, 0.5, conv_v)  # the CPU: measured and remembered
        chosen = {key: c.chosen for key, c in autotune.choices().items()}
        monkeypatch.setitem(
            autotune._CHOICES, next(iter(chosen)), autotune.Choice("plain", {}, {}, 0)
        )  # the CPU's: plain
        on_meta = [t.to("meta") for t in (q, k, k, conv_v)]
        audit = DeviceAudit("meta")
        with audit:
            out = factor_attention(*on_meta[:3], 0.5, on_meta[3])
    autotune.reset()
    assert devices == [torch.device("cpu"), torch.device("meta")]
    assert [key[-2] for key in chosen] == [torch.device("cpu")]
    assert "aten::addcmul_" in audit.ops  # the fused kernel: the term added in the output's layout
    assert out.shape == (2, 5, 8) and out.device.type == "meta" and not audit.foreign and not audit.cpu_only


def test_conv_bn_folds_the_batchnorm_without_the_cpus_channels_last_weight_off_the_cpu(kernels_on_meta: None) -> None:
    """Eval-mode Conv-BN in eager inference runs one convolution with the BatchNorm folded in (no batch norm op);
    the folded weight is channels-last on the CPU only (oneDNN's layout), contiguous elsewhere."""
    conv, bn = nn.Conv2d(4, 8, 3, padding=1, device="meta"), nn.BatchNorm2d(8, device="meta").eval()
    audit = DeviceAudit("meta")
    with audit, torch.no_grad():
        y = conv_bn(torch.empty(2, 4, 6, 6, device="meta"), conv, bn, act=nn.ReLU())
    assert y.shape == (2, 8, 6, 6) and not audit.foreign and not audit.cpu_only
    assert not any("batch_norm" in op for op in audit.ops) and "aten::relu_" in audit.ops
    folded_weight = conv.__dict__["_blockgraph_folded"][1][0]
    assert folded_weight.device.type == "meta" and folded_weight.is_contiguous()
    cpu_conv, cpu_bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        conv_bn(torch.randn(2, 4, 6, 6), cpu_conv, cpu_bn)
    assert cpu_conv.__dict__["_blockgraph_folded"][1][0].is_contiguous(memory_format=torch.channels_last)
