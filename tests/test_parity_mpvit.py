"""MPViT has no timm twin: parity with an independent plain-PyTorch reference (tests/reference/mpvit.py, written
from ARCHITECTURES.md, not from our blocks), loaded with the same weights through the spec's rename rules."""

from __future__ import annotations

import pytest
import torch

import blockgraph as bg
from tests.reference import mpvit as reference
from tests.support.weights import randomize_batchnorm

PARAMS = {"tiny": 5_843_736, "xsmall": 10_573_448, "small": 22_892_400, "base": 74_845_976}


@pytest.mark.parametrize("variant", list(PARAMS))
def test_mpvit_matches_the_independent_reference(variant: str) -> None:
    torch.manual_seed(0)
    ref = getattr(reference, f"mpvit_{variant}")().eval()
    randomize_batchnorm(ref, torch.Generator().manual_seed(1))
    ours = bg.create_model(f"mpvit_{variant}", outputs=["logits", "stage1", "stage2", "stage3", "stage4"]).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == PARAMS[variant]
    bg.load_timm_state_dict(ours, ref.state_dict())  # strict; the reference's alias keys collapse onto one
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected_logits, expected_maps = ref(x), ref.forward_features(x)
        got = ours(x)
    torch.testing.assert_close(got["logits"], expected_logits, rtol=0, atol=1e-5)
    for k, expected in enumerate(expected_maps, start=1):
        torch.testing.assert_close(got[f"stage{k}"], expected, rtol=0, atol=1e-5)
    assert [expected.shape[-1] for expected in expected_maps] == [56, 28, 14, 7]


def test_features_only_gives_the_four_stage_maps() -> None:
    model = bg.create_model("mpvit_tiny", features_only=True, device="meta")
    assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == [(96, 4), (176, 8), (216, 16), (216, 32)]
