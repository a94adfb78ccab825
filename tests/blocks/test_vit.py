"""ViT and DeiT specifics: the position grid is checked statically; resampling opens other sizes; distilled head."""

from __future__ import annotations

import pytest
import torch

import blockgraph as bg
from tests.conftest import ROOT

VIT = ROOT / "specs" / "vit_tiny_patch16_224.yaml"


def test_another_size_fails_validate_at_the_pos_embed_with_the_expected_size(run_cli) -> None:
    code, _, err = run_cli("validate", VIT, "--input", "3x256x320")
    assert code == 2
    first = err.splitlines()[0]
    assert first.startswith(f"{ROOT / 'specs' / 'vit.yaml'}:")
    assert "node 'pos'" in first and "covers a 14x14 token grid (input 224x224)" in first
    assert "resample: bicubic" in err


def test_resampling_accepts_other_sizes_and_runs(run_cli) -> None:
    code, out, err = run_cli("validate", VIT, "--input", "3x256x320", "--set", "resample=bicubic")
    assert code == 0, err
    assert "logits 1x1000" in out
    model = bg.build_model(VIT, overrides={"resample": "bicubic", "depth": 2}).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 320)).shape == (1, 1000)
        native = torch.randn(1, 3, 224, 224)
        reference = bg.build_model(VIT, overrides={"depth": 2}).eval()
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(native), reference(native), rtol=0, atol=0)  # no resampling at 14x14


def test_resampled_embedding_matches_timm_resample(run_cli) -> None:
    from tests.support.timm_oracle import import_timm

    timm = import_timm()
    pos = bg.build_model(VIT, overrides={"resample": "bicubic", "depth": 1}).get_submodule("pos")
    x = torch.zeros(1, 1 + 16 * 20, 192)
    with torch.no_grad():
        ours = pos(x, (16, 20))
        theirs = timm.layers.resample_abs_pos_embed(pos.weight, (16, 20), (14, 14), num_prefix_tokens=1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_deit_distilled_head_averages_in_eval_and_returns_both_in_train() -> None:
    torch.manual_seed(0)
    model = bg.create_model("deit_base_distilled_patch16_224", overrides={"depth": 1, "dim": 64, "heads": 2})
    x = torch.randn(2, 3, 224, 224)
    model.train()
    cls, dist = model(x)
    assert cls.shape == dist.shape == (2, 1000)
    model.eval()
    with torch.no_grad():
        head = model.get_submodule("head")
        tokens = model.get_submodule("blocks.0")(model.get_submodule("pos")(
            model.get_submodule("dist")(model.get_submodule("cls")(model.get_submodule("patch_embed")(x))), (14, 14)
        ))  # fmt: skip
        normed = head.norm(tokens)
        expected = (head.fc(normed[:, 0]) + head.fc_dist(normed[:, 1])) / 2
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    assert [n for n in model.state_dict() if "token" in n] == ["cls.token", "dist.token"]


@pytest.mark.parametrize("at, order", [(0, [9, 1, 2]), (1, [1, 9, 2])])
def test_insert_token_position(at: int, order: list[float]) -> None:
    from blockgraph.layers.tokens import InsertClsToken

    layer = InsertClsToken(1, at=at, init_std=0)
    with torch.no_grad():
        layer.token.fill_(9)
        x = torch.tensor([[[1.0], [2.0]]])
        assert layer(x).flatten().tolist() == order
