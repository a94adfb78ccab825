"""MPViT has no timm twin: parity with an independent plain-PyTorch reference (tests/reference/mpvit.py, written
from ARCHITECTURES.md, not from our blocks), loaded with the same weights through the spec's rename rules."""

from __future__ import annotations

import pytest
import torch

import blockgraph as bg
from blockgraph.ops.autotune import forcing
from tests.reference import mpvit as reference
from tests.support.weights import randomize_batchnorm

PARAMS = {"tiny": 5_843_736, "xsmall": 10_573_448, "small": 22_892_400, "base": 74_845_976}


def _pair(variant: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ref = getattr(reference, f"mpvit_{variant}")().eval()
    randomize_batchnorm(ref, torch.Generator().manual_seed(1))
    ours = bg.create_model(f"mpvit_{variant}", outputs=["logits", "stage1", "stage2", "stage3", "stage4"]).eval()
    bg.load_timm_state_dict(ours, ref.state_dict())  # strict; the reference's alias keys collapse onto one
    return ref.to(dtype), ours.to(dtype)


@pytest.mark.parametrize("variant", list(PARAMS))
def test_mpvit_matches_the_independent_reference(variant: str) -> None:
    ref, ours = _pair(variant, torch.float32)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == PARAMS[variant]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected_logits, expected_maps = ref(x), ref.forward_features(x)
        got = ours(x)  # eval + no_grad: the fused inference kernels (BatchNorm folded, channels-last, oneDNN)
    with torch.enable_grad(), forcing("plain"):
        plain = ours(x)  # the modules' own ops: the same kernels as the reference's (not oneDNN's training kernel)
    assert [expected.shape[-1] for expected in expected_maps] == [56, 28, 14, 7]
    torch.testing.assert_close(got["logits"], expected_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain["logits"], expected_logits, rtol=0, atol=1e-5)
    for k, expected in enumerate(expected_maps, start=1):
        torch.testing.assert_close(plain[f"stage{k}"], expected, rtol=0, atol=1e-5)
        # Other kernels sum in another order: float32 rounding, a few 1e-6 of the map's scale (stage 3 reaches |58|,
        # where one float32 ulp is 3.8e-6), so 1e-5 or 2e-6 of the scale if larger. The float64 test below holds
        # the fused math to 1e-10.
        scale = expected.abs().max().item()
        torch.testing.assert_close(got[f"stage{k}"], expected, rtol=0, atol=max(1e-5, 2e-6 * scale))


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_fused_inference_equals_the_reference_in_float64(variant: str) -> None:
    ref, ours = _pair(variant, torch.float64)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        expected_logits, expected_maps = ref(x), ref.forward_features(x)
        got = ours(x)
    torch.testing.assert_close(got["logits"], expected_logits, rtol=0, atol=1e-10)
    for k, expected in enumerate(expected_maps, start=1):
        torch.testing.assert_close(got[f"stage{k}"], expected, rtol=0, atol=1e-10)


def test_features_only_gives_the_four_stage_maps() -> None:
    model = bg.create_model("mpvit_tiny", features_only=True, device="meta")
    assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == [(96, 4), (176, 8), (216, 16), (216, 32)]
