"""CoaT's token ops (blockgraph/ops/coat.py): both eager inference kernels against the references, in float64, with
and without extra (cls) tokens, and for trimmed queries. The references themselves are checked against timm's
formulas through the layers (tests/blocks/test_optimizations.py)."""

from __future__ import annotations

import pytest
import torch

from blockgraph.ops.autotune import forcing
from blockgraph.ops.coat import conv_pos_enc, factor_attention

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
