"""Tests of blockgraph.graph.infer: static types, accepted input sizes, size checks, feature strides; and that the
accepted sizes are exactly the sizes the compiled model runs on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockgraph as bg
from blockgraph.errors import BlockgraphError, ShapeError
from blockgraph.pipeline import Analysis
from tests.conftest import ROOT
from tests.support.positions import at, where

FAMILY = ROOT / "specs" / "coat_lite.yaml"
SMALL = ROOT / "specs" / "coat_lite_small.yaml"


@pytest.fixture(scope="module")
def small() -> Analysis:
    return bg.analyze(SMALL)


# -------------------------------------------------------------------------------------------------------------- types

TYPES = {
    "image": "image[3, H, W]",
    "stage1.patch_embed": "tokens[(H//4)*(W//4), 64]",
    "stage1.cls": "tokens[1 + (H//4)*(W//4), 64]",
    "stage1.blocks.2": "tokens[1 + (H//4)*(W//4), 64]",
    "stage1.to_map": "image[64, H//4, W//4]",
    "stage2.patch_embed": "tokens[(H//8)*(W//8), 128]",
    "stage2.to_map": "image[128, H//8, W//8]",
    "stage3.blocks.5": "tokens[1 + (H//16)*(W//16), 320]",
    "stage4.cls": "tokens[1 + (H//32)*(W//32), 512]",
    "stage4.to_map": "image[512, H//32, W//32]",
    "head": "vector[1000]",
}


@pytest.mark.parametrize(("node", "expected"), TYPES.items(), ids=list(TYPES))
def test_coat_lite_small_types(small: Analysis, node: str, expected: str) -> None:
    assert str(small.inference.types[node]) == expected
    assert small.graph.node(node).meta["type"] is small.inference.types[node]


def test_every_node_has_a_type(small: Analysis) -> None:
    assert set(small.inference.types) == set(small.graph.nodes)
    assert [n for n in small.graph.nodes if n.startswith("stage3.blocks.")] == [f"stage3.blocks.{i}" for i in range(6)]


def test_concrete_shapes(small: Analysis) -> None:
    assert small.inference.shape("stage3.to_map", 480, 640, batch=2) == (2, 320, 30, 40)
    assert small.inference.shape("stage1.cls", 224, 224) == (1, 1 + 56 * 56, 64)


def test_accepted_sizes(small: Analysis) -> None:
    acceptance = small.inference.acceptance
    assert acceptance.describe() == ["H >= 32", "W >= 32"]
    assert acceptance.contains({"H": 32, "W": 32})
    assert not acceptance.contains({"H": 31, "W": 500})


# -------------------------------------------------------------------------------------------------------------- check


def test_check_accepts_a_good_size(small: Analysis) -> None:
    small.inference.check(224, 224, channels=3)
    small.inference.check(32, 1000)


@pytest.mark.parametrize(
    ("size", "nearest"),
    [((30, 50), "nearest: H = 32"), ((30, 20), "nearest: H = 32, W = 32"), ((64, 16), "nearest: W = 32")],
)
def test_check_names_the_node_and_suggests_the_nearest_sizes(
    small: Analysis, size: tuple[int, int], nearest: str
) -> None:
    h, w = size
    with pytest.raises(ShapeError, match=f"input {h}x{w}: the map .* is smaller than the kernel window 2") as info:
        small.inference.check(h, w)
    error = info.value
    assert error.node == "stage4.patch_embed"
    assert error.hint == f"this model accepts any H, W >= 32; {nearest}"
    text = FAMILY.read_text()
    assert (Path(error.file).resolve(), where(error.pos)) == (FAMILY, at(text, "patch: ${patches[i]}", 7))
    assert [label for label, _ in error.pos.trail()] == ["variable 'patches' defined"]


def test_check_reports_every_failing_node(small: Analysis) -> None:
    with pytest.raises(BlockgraphError) as info:
        small.inference.check(1, 1)
    assert [e.node for e in info.value.errors] == [f"stage{i}.patch_embed" for i in range(1, 5)]
    assert all(isinstance(e, ShapeError) for e in info.value.errors)


def test_check_channels(small: Analysis) -> None:
    with pytest.raises(ShapeError, match="the input has 1 channels, the model takes 3") as info:
        small.inference.check(224, 224, channels=1)
    assert info.value.node == "image"
    assert "3x224x224" in info.value.hint


# ----------------------------------------------------------------------------------------------------------- features


def family_child(tmp_path: Path, body: str) -> tuple[Path, str]:
    text = f"name: child\nextends: {FAMILY}\nvariant: small\n{body}"
    path = tmp_path / "child.yaml"
    path.write_text(text)
    return path, text


def test_feature_strides_are_checked(tmp_path: Path) -> None:
    path, text = family_child(tmp_path, "features:\n  stage1: {stride: 8}\n")
    with pytest.raises(
        ShapeError, match="feature 'stage1' declares stride 8, but 'stage1.to_map' has stride 4"
    ) as info:
        bg.analyze(path)
    assert info.value.node == "stage1.to_map"
    assert (info.value.file, where(info.value.pos)) == (str(path), at(text, "8}"))
    assert "`stride: 4`" in info.value.hint


def test_correct_feature_strides(small: Analysis) -> None:
    strides = {name: small.inference.types[out.node].stride() for name, out in small.graph.features.items()}
    assert strides == {"stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32}


def test_a_feature_must_be_a_map(tmp_path: Path) -> None:
    path, text = family_child(tmp_path, "features:\n  pooled: {from: head}\n")
    with pytest.raises(ShapeError, match=r"feature 'pooled' must be a map, but 'head' gives vector\[1000\]") as info:
        bg.analyze(path)
    assert info.value.node == "head"
    assert where(info.value.pos) == at(text, "head}")


# -------------------------------------------------------------------------------- accepted sizes == sizes that run

TINY = """\
name: tiny2
input: {channels: 3, size: [32, 32]}
stages:
  - name: s1
    shared:
      cpe: {op: conv_pos_enc, dim: 16}
      crpe: {op: conv_rel_pos_enc, dim: 16, heads: 2, windows: {3: 1, 5: 1}}
    blocks:
      - {name: embed, op: conv_patch_embed, dim: 16, patch: 3}
      - {name: cls, op: insert_cls_token, dim: 16}
      - {name: block, op: serial_block, dim: 16, heads: 2, cpe: cpe, crpe: crpe}
      - {name: no_cls, op: remove_cls_token}
      - {name: to_map, op: tokens_to_map}
  - name: s2
    blocks:
      - {name: embed, op: conv_patch_embed, dim: 32, patch: 5}
      - {name: mlp, op: mlp, dim: 32}
blocks:
  - {name: head, op: cls_head, dim: 32, num_classes: 5, pool: avg}
outputs: {logits: head}
"""


@pytest.fixture(scope="module")
def tiny() -> tuple[Analysis, Any]:
    return bg.analyze(TINY), bg.build_model(TINY, device="meta")


def test_tiny_accepted_sizes(tiny: tuple[Analysis, Any]) -> None:
    assert tiny[0].inference.acceptance.describe() == ["H >= 15", "W >= 15"]


def rejected(check: Callable[..., object], *args: object) -> bool:
    """Whether ``check(*args)`` rejects the size; any error other than shape errors fails the test."""
    try:
        check(*args)
    except BlockgraphError as e:
        assert all(isinstance(x, ShapeError) for x in e.errors), e.format()
        return True
    return False


sizes = st.integers(min_value=1, max_value=300)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=sizes, w=sizes)
def test_acceptance_is_exactly_the_sizes_that_pass_check_and_run(
    small: Analysis, tiny: tuple[Analysis, Any], h: int, w: int
) -> None:
    import torch

    assert small.inference.acceptance.contains({"H": h, "W": w}) == (not rejected(small.inference.check, h, w))
    analysis, model = tiny
    accepted = analysis.inference.acceptance.contains({"H": h, "W": w})
    assert accepted == (not rejected(analysis.inference.check, h, w))
    x = torch.empty(2, 3, h, w, device="meta")
    assert accepted == (not rejected(model, x))
    if accepted:
        assert tuple(model(x).shape) == (2, 5)


@pytest.mark.parametrize(("h", "w"), [(14, 15), (15, 14), (15, 15), (1, 300), (300, 1)])
def test_acceptance_boundary_on_the_meta_device(tiny: tuple[Analysis, Any], h: int, w: int) -> None:
    import torch

    analysis, model = tiny
    x = torch.empty(1, 3, h, w, device="meta")
    assert analysis.inference.acceptance.contains({"H": h, "W": w}) == (not rejected(model, x))


def test_a_size_several_nodes_reject_is_still_a_shape_error(tiny: tuple[Analysis, Any]) -> None:
    # Inference.check and BlockgraphModel._reject document ShapeError; several failing nodes must not escape
    # `except ShapeError` (at 560bd78 they raised a plain MultiError).
    import torch

    analysis, model = tiny
    with pytest.raises(ShapeError) as info:
        analysis.inference.check(1, 1)
    assert [e.node for e in info.value.errors] == ["s1.embed", "s2.embed"]
    with pytest.raises(ShapeError) as info:
        model(torch.empty(1, 3, 1, 1, device="meta"))
    assert len(info.value.errors) == 2
