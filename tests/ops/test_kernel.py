"""When the ops may run their eager inference kernels (and when they must not), and whole reference models through
those kernels against the same models through the plain references, in float64, where any difference in the math
would show. Each kernel alone is tested beside its op (test_linear, test_conv, test_coat)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blockgraph as bg
from blockgraph.ops.autotune import forcing
from blockgraph.ops.kernel import eager_inference
from tests.support.weights import ops_called, randomize_batchnorm


def test_eager_inference_only_without_autograd_on_a_real_device() -> None:
    x = torch.zeros(2)
    with torch.no_grad():
        assert eager_inference(x)
        assert not eager_inference(x.to("meta"))
    with torch.inference_mode():
        assert eager_inference(x)
    assert not eager_inference(x)  # autograd records: the kernels have no derivative formula


def test_no_eager_inference_while_compiling_or_exporting() -> None:
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(eager_inference(x))
            return x + 1

    probe = Probe().eval()
    with torch.no_grad():
        torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(2))
        torch.export.export(probe, (torch.zeros(2),))
    assert seen and not any(seen)


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny", "vit_tiny_patch16_224", "mobilevit_xxs", "mpvit_tiny"])
def test_inference_kernels_equal_the_plain_model(name: str) -> None:
    """The same model through the inference kernels (eval + no_grad) vs the ops' references (autograd on), in
    float64: the kernels' math is the references' (1e-10), and in float32 they agree within the 1e-5 the twins are
    held to."""
    torch.manual_seed(0)
    model = bg.create_model(name).eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(3))
    h, w = model.spec.input.size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        model, x = model.to(dtype), x.to(dtype)
        with torch.no_grad():
            got = model(x)
        plain = model(x).detach()
        torch.testing.assert_close(got, plain, rtol=0, atol=atol)


def test_training_mode_normalizes_by_the_batch() -> None:
    """In training, even without gradients, BatchNorm normalizes by the batch: no folded Conv-BN (in eval, every
    BatchNorm is folded into its convolution)."""
    model = bg.create_model("mobilevit_xxs").train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        called = ops_called(lambda: model(x))
    assert "aten::native_batch_norm" in called
    with torch.no_grad(), forcing("fused"):
        called = ops_called(lambda: model.eval()(x))
    assert "mkldnn::_linear_pointwise" in called and "aten::native_batch_norm" not in called
