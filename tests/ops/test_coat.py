"""CoaT's token ops (blockgraph/ops/coat.py): both eager inference kernels against the references, in float64, with
and without extra (cls) tokens, and for trimmed queries; the training node of the whole attention (its own backward)
against the reference ops' gradients. The references themselves are checked against timm's
formulas through the layers (tests/blocks/test_optimizations.py)."""

from __future__ import annotations

import pytest
import torch

from blockgraph.ops.autotune import forcing
from blockgraph.ops.coat import _crpe_reference, conv_pos_enc, factor_attention, factor_attention_crpe

f64 = {"dtype": torch.float64}


def _check(fn, *args) -> None:
    """Both eager inference kernels (the autotuner's candidates, each forced) equal the reference."""
    reference = fn(*args)  # autograd records (inputs require grad): the reference
    for kernel in ("fused", "plain"):
        with torch.no_grad(), forcing(kernel):
            fast = fn(*args)
        assert reference.requires_grad and not fast.requires_grad
        torch.testing.assert_close(fast, reference.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("extra", [0, 1, 2])
def test_conv_pos_enc_kernel_equals_the_reference(extra: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, extra + 5 * 6, 8, **f64, requires_grad=True)
    weight, bias = torch.randn(8, 1, 3, 3, **f64), torch.randn(8, **f64)
    _check(conv_pos_enc, x, (5, 6), weight, bias)
    reference = conv_pos_enc(x, (5, 6), weight, bias)
    assert torch.equal(reference[:, :extra], x[:, :extra])  # extra tokens pass unchanged
    img = x[:, extra:].transpose(1, 2).reshape(2, 8, 5, 6)
    conv = torch.nn.functional.conv2d(img, weight, bias, padding=1, groups=8)
    torch.testing.assert_close(reference[:, extra:], (img + conv).flatten(2).transpose(1, 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("extra", "queries", "term"), [(0, None, True), (0, None, False), (1, None, True), (2, None, True), (2, 2, False),
                                   (1, 1, False)],
)  # fmt: skip
def test_factor_attention_kernel_equals_the_reference(extra: int, queries: int | None, term: bool) -> None:
    """Every query, with or without the relative term, or only the first ``queries`` (all of them extra tokens,
    which get no relative term)."""
    torch.manual_seed(0)
    B, N, h, Ch = 2, extra + 5 * 6, 4, 3
    q, k, v = (torch.randn(B, N, h, Ch, **f64, requires_grad=True) for _ in range(3))
    if queries is not None:
        q = q[:, :queries]
    conv_v = torch.randn(B, N - extra, h, Ch, **f64) if term else None
    _check(factor_attention, q, k, v, Ch**-0.5, conv_v)
    expected = (q.transpose(1, 2) @ (k.transpose(1, 2).softmax(2).transpose(-1, -2) @ v.transpose(1, 2))) * Ch**-0.5
    expected = expected.transpose(1, 2).clone()
    if conv_v is not None:
        expected[:, extra:] += q[:, extra:] * conv_v
    got = factor_attention(q, k, v, Ch**-0.5, conv_v)
    torch.testing.assert_close(got, expected.reshape(B, q.shape[1], h * Ch), rtol=0, atol=1e-12)


@pytest.mark.parametrize("conv_kernel", ["blockgraph", "torch", "hybrid"])
@pytest.mark.parametrize(("extra", "bias"), [(0, True), (1, True), (2, False)])
def test_the_attention_training_node_gives_the_references_gradients(extra: int, bias: bool, conv_kernel: str) -> None:
    """factor_attention_crpe (one autograd node, its own backward) against the reference ops in float64: the same
    output, and gradients of qkv, the CRPE weight and bias within 1e-10, whichever backward the convolution takes; a
    gradient of the gradient (create_graph) goes through the reference's graph and equals it."""
    torch.manual_seed(0)
    B, h, Ch, size = 2, 4, 3, (5, 6)
    N = extra + size[0] * size[1]
    qkv = torch.randn(B, N, 3, h, Ch, **f64, requires_grad=True)
    weight = torch.randn(h * Ch, 1, 5, 5, **f64, requires_grad=True)
    b = torch.randn(h * Ch, **f64, requires_grad=True) if bias else None
    inputs = [t for t in (qkv, weight, b) if t is not None]
    with forcing(conv_kernel):
        got = factor_attention_crpe(qkv, Ch**-0.5, size, weight, b)
        assert type(got.grad_fn).__name__ == "_FactorAttentionCrpeBackward"
        upstream = torch.randn_like(got)
        grads = torch.autograd.grad(got, inputs, upstream)
    expected = _crpe_reference(qkv, Ch**-0.5, size, weight, b)
    assert torch.equal(got, expected)  # the same ops in the same order (timm's forward_fx test compares bits)
    for g, e in zip(grads, torch.autograd.grad(expected, inputs, upstream, retain_graph=True), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    (gq,) = torch.autograd.grad((factor_attention_crpe(qkv, Ch**-0.5, size, weight, b) * upstream).sum(), qkv,
                                create_graph=True)  # fmt: skip
    second = torch.autograd.grad(gq.square().sum(), weight)[0]
    (gq,) = torch.autograd.grad((expected * upstream).sum(), qkv, create_graph=True)
    torch.testing.assert_close(second, torch.autograd.grad(gq.square().sum(), weight)[0], rtol=0, atol=1e-10)


def test_the_attention_training_node_runs_in_the_autocast_dtype() -> None:
    """Under bf16 autocast: a bf16 output equal to the reference ops' under the same autocast (to bf16 rounding),
    float32 gradients for the float32 CRPE weight."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 31, 3, 4, 8, requires_grad=True)
    weight = torch.randn(32, 1, 7, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = factor_attention_crpe(qkv.bfloat16(), 8**-0.5, (5, 6), weight, None)
        expected = _crpe_reference(qkv.bfloat16(), 8**-0.5, (5, 6), weight, None)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    gw = torch.autograd.grad(got.float().square().sum(), weight)[0]
    ew = torch.autograd.grad(expected.float().square().sum(), weight)[0]
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gw, ew, rtol=3e-2, atol=3e-2 * ew.abs().max().item())
