"""The linear op (blockgraph/ops/linear.py): its oneDNN kernels against the plain reference, with an activation or
a residual in the epilogue, in eager inference and in graphs compiled for inference; its training kernels, eager and
compiled."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from blockgraph.layers.common import Linear
from blockgraph.ops import autotune
from blockgraph.ops import linear as linear_module
from blockgraph.ops.autotune import forcing, tuning
from blockgraph.ops.linear import linear
from tests.support.weights import ops_called

ACTS = [None, nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU(), nn.Hardswish(), nn.Tanh(), nn.Identity()]


KERNELS = ["fused", "plain"]
"""The eager inference kernels the autotuner chooses between (blockgraph/ops/autotune.py): each is tested."""


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: repr(a))
@pytest.mark.parametrize("shape", [(7, 24), (2, 9, 24), (2, 3, 4, 24)])
def test_linear_with_activation_equals_the_reference(
    kernel: str, act: nn.Module | None, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    layer, x = nn.Linear(24, 40), torch.randn(shape)
    expected = (layer(x) if act is None else act(layer(x))).detach()
    with forcing("plain"):  # the reference (autograd records: a training kernel would be chosen by measuring)
        torch.testing.assert_close(linear(x, layer.weight, layer.bias, act=act), expected, rtol=0, atol=0)
    with torch.no_grad(), forcing(kernel):
        torch.testing.assert_close(linear(x, layer.weight, layer.bias, act=act), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_residual_equals_the_layer_plus_residual(kernel: str, bias: bool) -> None:
    torch.manual_seed(0)
    layer, x = nn.Linear(24, 16, bias=bias), torch.randn(2, 9, 24)
    residual = torch.randn(2, 16, 9).transpose(1, 2)  # a strided residual too
    with torch.no_grad(), forcing(kernel):
        got = linear(x, layer.weight, layer.bias, residual=residual)
        torch.testing.assert_close(got, residual + layer(x), rtol=0, atol=1e-5)
        broadcast = torch.randn(16)  # not the output's shape: the plain add
        got = linear(x, layer.weight, layer.bias, residual=broadcast)
        torch.testing.assert_close(got, broadcast + layer(x), rtol=0, atol=0)


def test_linear_runs_onednn_on_the_cpu_in_float32_and_plain_ops_elsewhere() -> None:
    layer, x = nn.Linear(8, 8), torch.randn(3, 8)
    with torch.no_grad(), forcing("fused"):
        assert "mkldnn::_linear_pointwise" in ops_called(lambda: linear(x, layer.weight, layer.bias, act=nn.GELU()))
    with torch.no_grad(), forcing("plain"):
        called = ops_called(lambda: linear(x, layer.weight, layer.bias, act=nn.GELU()))
        assert "mkldnn::_linear_pointwise" not in called and "aten::linear" in called
    with torch.no_grad():
        double = nn.Linear(8, 8).double()
        called = ops_called(lambda: linear(x.double(), double.weight, double.bias, act=nn.GELU()))
        assert "mkldnn::_linear_pointwise" not in called
        got = linear(x.double(), double.weight, double.bias, act=nn.SiLU())
        torch.testing.assert_close(got, F.silu(double(x.double())), rtol=0, atol=1e-15)
    with forcing("plain"):  # autograd records: the reference (or oneDNN's training kernel, when it is chosen)
        called = ops_called(lambda: linear(x, layer.weight, layer.bias, act=nn.GELU()))
    assert "mkldnn::_linear_pointwise" not in called and "aten::linear" in called


@pytest.mark.skipif(not linear_module._ONEDNN, reason="oneDNN's matrix multiply")
def test_a_graph_compiled_for_inference_calls_the_eager_kernels_on_large_products() -> None:
    """A graph traced without gradients calls the eager inference path as one op (``blockgraph::linear_inference``:
    the packed weight, the activation or the scaled residual in the epilogue) when the product is large enough,
    ``F.linear`` (so autograd) otherwise; the compiled result is the reference's within float32 rounding, its strides
    the fake kernel's (a permuted input, as a map's linear layer gives it). ``aot_eager`` runs the traced graph
    eagerly (the ops it holds show in the profile); inductor once, for the values."""
    torch.manual_seed(0)
    layer = Linear(256, 512)
    large = torch.randn(1, 128, 256)  # 128 * 256 * 512 multiply-adds: at least COMPILED_MIN_MACS
    small = torch.randn(1, 64, 256)
    assert large.numel() * 512 >= linear_module.COMPILED_MIN_MACS > small.numel() * 512
    residual, gamma = torch.randn(1, 128, 512), torch.rand(512) + 0.5

    def graph_ops(fn, x: torch.Tensor) -> set[str]:
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
        compiled(x)
        return ops_called(lambda: compiled(x))

    with torch.no_grad():
        assert "blockgraph::linear_inference" in graph_ops(layer, large)
        assert "blockgraph::linear_inference" not in graph_ops(layer, small)
        assert "blockgraph::linear_inference" not in ops_called(lambda: layer(large))  # eager: its own kernel
        gelu, scaled = partial(layer, act=nn.GELU()), partial(layer, residual=residual, scale=gamma)
        assert "blockgraph::linear_inference" in graph_ops(gelu, large)
        assert "blockgraph::linear_inference" in graph_ops(scaled, large)
        reference = F.linear(large, layer.weight, layer.bias)
        for fn, expected in ((layer, reference), (gelu, F.gelu(reference)), (scaled, residual + reference * gamma)):
            got = torch.compile(fn, fullgraph=True, dynamic=False)(large)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            torch._dynamo.reset()
        permuted = torch.randn(1, 256, 16, 8).permute(0, 2, 3, 1)
        real = torch.ops.blockgraph.linear_inference(permuted, layer.weight, layer.bias, "gelu", "none", None, None)
        with FakeTensorMode() as mode:
            fake = torch.ops.blockgraph.linear_inference(
                mode.from_tensor(permuted), mode.from_tensor(layer.weight), mode.from_tensor(layer.bias),
                "gelu", "none", None, None,
            )  # fmt: skip
        assert (real.shape, real.stride()) == (fake.shape, fake.stride())
    assert "blockgraph::linear_inference" not in graph_ops(layer, large)  # gradients recorded: F.linear
    torch._dynamo.reset()
    x = large.clone().requires_grad_()
    torch.compile(layer, backend="aot_eager", fullgraph=True)(x).square().sum().backward()
    expected = torch.autograd.grad(F.linear(large, layer.weight, layer.bias).square().sum(), layer.weight)[0]
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", ["onednn", "mm"])
@pytest.mark.parametrize(("rows", "features", "out"), [(37, 24, 16), (37, 16, 24), (0, 16, 24)])
def test_the_weight_gradient_is_the_references_with_either_kernel(kernel: str, rows: int, features: int, out: int):
    """``weight_grad`` (``grad.T @ x``) by oneDNN on transposed views (either operand the wider) or by ``mm``, each
    forced (the autotuner picks by timing): the float64 product within float32 rounding, contiguous ``[out, in]``,
    zeros for no rows; a non-contiguous operand is made contiguous first."""
    torch.manual_seed(0)
    grad, x = torch.randn(rows, out), torch.randn(features, rows).t()
    with forcing(kernel):
        got = linear_module.weight_grad(grad, x)
    assert got.shape == (out, features) and got.is_contiguous()
    torch.testing.assert_close(got.double(), grad.double().t() @ x.double(), rtol=1e-5, atol=1e-5)


TRAINING_OPS = {"blockgraph::linear_training", "blockgraph::linear_grad_input", "blockgraph::linear_grad_weight"}


@pytest.mark.parametrize("input_grad", [True, False])
def test_a_graph_compiled_for_training_runs_onednn_forward_and_backward_on_large_products(input_grad: bool) -> None:
    """A graph traced with gradients recorded calls ``blockgraph::linear_training`` for a product of at least
    COMPILED_MIN_MACS multiply-adds (oneDNN's forward; its backward, in the compiled backward graph, the input's and
    the weight's gradients as ops of ours, the input's only when it is wanted), ``F.linear`` for a smaller one; the
    output and gradients are the float64 reference's within float32 rounding (aot_eager: the traced graphs run
    eagerly, their ops in the profile; inductor: the values), for two input sizes under ``dynamic=True``."""
    torch.manual_seed(0)
    layer = Linear(256, 512)
    large, small = torch.randn(2, 64, 256), torch.randn(1, 64, 256)
    assert large.numel() * 512 >= linear_module.COMPILED_MIN_MACS > small.numel() * 512
    exact = nn.Linear(256, 512).double()
    exact.load_state_dict(layer.state_dict())

    def step(fn, x: torch.Tensor) -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(input_grad)
        y = fn(x)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        return [y, *([x.grad] if input_grad else []), layer.weight.grad, layer.bias.grad]

    def reference(x: torch.Tensor) -> list[torch.Tensor]:
        exact.zero_grad(set_to_none=True)
        x = x.double().requires_grad_(input_grad)
        y = exact(x)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y))
        return [y, *([x.grad] if input_grad else []), exact.weight.grad, exact.bias.grad]

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)
    step(compiled, large)
    wanted = TRAINING_OPS - (set() if input_grad else {"blockgraph::linear_grad_input"})
    assert TRAINING_OPS & ops_called(lambda: step(compiled, large)) == wanted
    assert not TRAINING_OPS & ops_called(lambda: step(compiled, small))
    runs = (("aot_eager", large), ("inductor", torch.randn(3, 48, 256))) if input_grad else (("aot_eager", large),)
    for backend, x in runs:
        torch._dynamo.reset()
        fn = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)
        for got, want in zip(step(fn, x), reference(x), strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4, msg=backend)
    torch._dynamo.reset()


def _check_fused(layer: nn.Linear, rows: int) -> None:
    """The layer's values through the fused kernel, with no epilogue, a GELU and a residual, at ``rows`` rows."""
    x, r = torch.randn(rows, 24), torch.randn(rows, 40)
    want = layer(x)
    torch.testing.assert_close(linear(x, layer.weight, layer.bias), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(linear(x, layer.weight, layer.bias, act=nn.GELU()), F.gelu(want), rtol=0, atol=1e-5)
    torch.testing.assert_close(linear(x, layer.weight, layer.bias, residual=r), want + r, rtol=0, atol=1e-5)


@pytest.mark.skipif(not linear_module._ONEDNN, reason="oneDNN's matrix multiply")
def test_the_fused_kernel_packs_each_weight_once_and_again_when_it_changes() -> None:
    """The fused kernel reads a copy of the weight packed into oneDNN's layout, made on first use and kept while the
    weight lives and is unchanged: any number of rows reads it; an update in place, a ``load_state_dict`` or a move
    of its memory packs it again (the values follow the weight); a view, an inference tensor and a non-contiguous
    weight are read as they are; the copy goes with the weight."""
    import gc

    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    packed = linear_module.packed_weight
    with torch.no_grad(), forcing("fused"):
        _check_fused(layer, 7)
        first = packed(layer.weight, 7)
        assert first.is_mkldnn and packed(layer.weight, 300) is first  # once, for any rows
        _check_fused(layer, 300)
        layer.weight.mul_(-2)  # in place: packed again, the new values read
        assert packed(layer.weight, 7) is not first
        _check_fused(layer, 5)
        again = packed(layer.weight, 7)
        layer.load_state_dict(nn.Linear(24, 40).state_dict())
        assert packed(layer.weight, 7) is not again
        _check_fused(layer, 5)
        layer.weight.data = layer.weight.data.clone()  # its memory replaced (as .to() does)
        _check_fused(layer, 5)
        view = layer.weight[:20]
        assert packed(view, 7) is view and not view.is_mkldnn
        transposed = torch.randn(24, 40).t()
        assert packed(transposed, 7) is transposed
    with torch.inference_mode():
        frozen = torch.randn(40, 24)
    assert packed(frozen, 7) is frozen
    count = len(linear_module._PACKED)
    del layer, view
    gc.collect()
    assert len(linear_module._PACKED) == count - 1


def test_a_write_through_data_is_seen_after_release_and_at_a_models_eval() -> None:
    """A write through ``.data`` does not count in the weight's version: the packed copy is released by
    ``release_packed`` and by a compiled model's ``eval()``/``train()``, after which the new values are read."""
    import blockgraph as bg

    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    with torch.no_grad(), forcing("fused"):
        _check_fused(layer, 7)
        layer.weight.data.mul_(-2)  # (the version counter of .data is its own)
        linear_module.release_packed([layer.weight])
        _check_fused(layer, 7)
        linear_module.release_packed()
        assert len(linear_module._PACKED) == 0
    model = bg.create_model("vit_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), forcing("fused"):
        model(x)
        assert any(p in linear_module._PACKED for p in model.parameters())
        for p in model.parameters():
            p.data.mul_(0.5)
        model.eval()
        assert all(p not in linear_module._PACKED for p in model.parameters())
        fused = model(x)
        with forcing("plain"):
            torch.testing.assert_close(fused, model(x), rtol=0, atol=1e-5)


def test_a_weight_keeps_its_packed_copy_only_where_the_fused_kernel_is_chosen(monkeypatch) -> None:
    """Timing the fused kernel packs the weight; when the plain kernel is chosen, the copy is dropped (a later shape
    that chooses the fused one packs it again and keeps it)."""
    layer, x = nn.Linear(24, 40), torch.randn(3, 24)
    verdict = ["plain"]

    def measure(candidates: dict, device: torch.device) -> autotune.Choice:
        for call in candidates.values():
            call()
        return autotune.Choice(verdict[0], {}, {}, 1)

    monkeypatch.setattr(autotune, "_measure", measure)
    with torch.no_grad(), tuning(True):
        linear(x, layer.weight, layer.bias)  # both run, the fused one declared slower: its copy not kept
        assert layer.weight not in linear_module._PACKED
        verdict[0] = "fused"
        torch.testing.assert_close(linear(x[:2], layer.weight, layer.bias), layer(x[:2]), rtol=0, atol=1e-5)
        assert layer.weight in linear_module._PACKED
        linear(x, layer.weight, layer.bias)  # the first shape: plain, remembered; the copy stays for the second
        assert layer.weight in linear_module._PACKED
    autotune.reset()


def test_a_model_gives_the_same_values_with_either_kernel() -> None:
    """ViT-Tiny in eager inference: oneDNN's fused kernels and the plain ones agree to float rounding."""
    import blockgraph as bg

    model = bg.create_model("vit_tiny_patch16_224").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        with forcing("fused"):
            fused = model(x)
        with forcing("plain"):
            plain = model(x)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("shape", "out"), [((7, 24), 40), ((2, 9, 24), 40), ((2, 3, 4, 24), 40), ((2, 3, 4, 24), 16)])
def test_a_training_step_gives_the_references_gradients_with_either_kernel(
    kernel: str, shape: tuple[int, ...], out: int
) -> None:
    """In an eager training step (autograd recording) the fused kernel (oneDNN for the forward and both gradients;
    the weight's with either operand on oneDNN's weight side: 24 -> 40 and 24 -> 16 features) and the plain one
    give the float64 reference's output and gradients to float32 accuracy (the first derivatives, computed with
    grad mode off, and a second derivative, through differentiable ops)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(shape, requires_grad=True), torch.randn(out, 24, requires_grad=True), torch.randn(out)
    b.requires_grad_()
    grad = torch.randn(*shape[:-1], out)
    with forcing(kernel):
        y = linear(x, w, b, act=nn.GELU(), residual=torch.randn(*shape[:-1], out).mul(0))
        first = torch.autograd.grad(y, (x, w, b), grad, retain_graph=True)
        (gx,) = torch.autograd.grad((y * grad).sum(), x, create_graph=True)
        gx.square().sum().backward()
    exact = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = F.gelu(F.linear(*exact))
    for got, want in zip(first, torch.autograd.grad(y64, exact, grad.double(), retain_graph=True), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    (gx64,) = torch.autograd.grad((y64 * grad.double()).sum(), exact[0], create_graph=True)
    gx64.square().sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-5, atol=1e-5)
    for got, want in zip((x, w, b), exact, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


def test_a_training_step_runs_onednn_when_it_is_chosen() -> None:
    layer, x = nn.Linear(8, 8), torch.randn(3, 8, requires_grad=True)
    with forcing("fused"):
        called = ops_called(lambda: linear(x, layer.weight, layer.bias).sum().backward())
    assert "mkldnn::_linear_pointwise" in called
    with forcing("plain"), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: F.linear, in bf16
        y = linear(x, layer.weight, layer.bias)
    assert y.dtype == torch.bfloat16


def test_a_training_kernel_is_chosen_by_timing_its_forward_and_backward(monkeypatch) -> None:
    """A training step's choice times each kernel's forward and backward (their gradients on detached copies: the
    layer's own gradients stay untouched), not the forward alone."""
    timed: list[tuple[bool, list[bool]]] = []
    step = autotune.step

    def spy(call):
        x, weight, _ = call.args
        timed.append((torch.is_grad_enabled(), [t.requires_grad for t in (x, weight)]))
        return step(call)

    monkeypatch.setattr(autotune, "step", spy)
    layer, x = nn.Linear(8, 8), torch.randn(5, 8)  # an input without gradient: the first layer's
    with tuning(True):
        y = linear(x, layer.weight, layer.bias)
    key = [k for k in autotune.choices() if k[:3] == ("linear", "train", (5, 8))]
    choice = key and autotune.choices()[key[0]]
    assert choice and set(choice.seconds) == {"fused", "plain"}
    assert len(timed) == 2 * (1 + choice.rounds) and timed[0] == (False, [False, True])
    assert layer.weight.grad is None and y.grad_fn is not None
    y.sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(8, 8))
    with pytest.raises(TypeError, match="functools.partial"):
        step(lambda: F.linear(x, layer.weight))  # (the real one: the spy is still in place)
