"""specs/vit_small_early_conv.yaml (no timm twin) against the independent module of tests/reference/early_conv_vit.py:
the same parameters, the same logits with the same weights, in eval and in train mode (BatchNorm on batch
statistics)."""

from __future__ import annotations

import pytest
import torch

import blockgraph as bg
from tests.conftest import ROOT
from tests.reference.early_conv_vit import EarlyConvViT, ours_to_reference
from tests.support.weights import randomize_batchnorm

SPEC = ROOT / "specs" / "vit_small_early_conv.yaml"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_the_independent_module(train: bool) -> None:
    torch.manual_seed(0)
    ours = bg.build_model(SPEC, overrides={"depth": 2})
    reference = EarlyConvViT(depth=2)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    randomize_batchnorm(ours, torch.Generator().manual_seed(1))
    state = {ours_to_reference(k): v for k, v in ours.state_dict().items()}
    reference.load_state_dict(state, strict=True)
    ours.train(train), reference.train(train)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)


def test_full_size_parameter_count() -> None:
    with torch.device("meta"):
        reference = EarlyConvViT()
    expected = sum(p.numel() for p in reference.parameters())
    assert bg.validate(SPEC).params == expected == 21_002_392
