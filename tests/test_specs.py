"""One battery over every reference spec in specs/: build, static shapes == runtime shapes, gradients,
determinism, feature_info."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blockgraph as bg
from tests.conftest import SPECS

SIZES = [(224, 224), (480, 640), (256, 320), (250, 333)]
ids = [p.stem for p in SPECS]


def _all_outputs(path: Path) -> list[str]:
    analysis = bg.analyze(path)
    return list(analysis.graph.outputs) + list(analysis.graph.features)


def _shrunk(path: Path) -> torch.nn.Module:
    """The spec at depth 1 per stage: same blocks, same shape rules, a fraction of the compute."""
    variables = bg.analyze(path).spec.variables
    overrides = {"depths": [1] * len(variables["depths"])} if "depths" in variables else {}
    return bg.build_model(path, overrides=overrides, outputs=_all_outputs(path))


@pytest.mark.parametrize("path", SPECS, ids=ids)
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_static_shapes_equal_runtime_shapes(path: Path, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = bg.build_model(path, outputs=_all_outputs(path)).eval()
    h, w = size
    expected = {name: t.shape({"H": h, "W": w}, batch=1) for name, t in model.node_types().items()}
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape))
        for name in model.nodes
    ]
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    for hook in hooks:
        hook.remove()
    assert set(seen) == set(expected)
    mismatched = {n: (tuple(seen[n]), expected[n]) for n in expected if tuple(seen[n]) != expected[n]}
    assert not mismatched
    assert all(torch.isfinite(v).all() for v in out.values())


def test_coat_lite_small_seed_shapes() -> None:
    """ARCHITECTURES.md 2.2: coat_lite_small on 1x3x480x640."""
    path = Path("specs/coat_lite_small.yaml")
    model = bg.build_model(path, outputs=["stage1", "stage2", "stage3", "stage4", "logits"]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 480, 640))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "stage1": (1, 64, 120, 160),
        "stage2": (1, 128, 60, 80),
        "stage3": (1, 320, 30, 40),
        "stage4": (1, 512, 15, 20),
        "logits": (1, 1000),
    }
    assert tuple(model.node_types()["stage1.blocks.2"].shape({"H": 480, "W": 640}, batch=1)) == (1, 19201, 64)


@pytest.mark.parametrize("path", SPECS, ids=ids)
def test_every_parameter_gets_a_gradient(path: Path) -> None:
    torch.manual_seed(0)
    model = _shrunk(path).train()
    out = model(torch.randn(2, 3, 64, 96))
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("path", SPECS, ids=ids)
def test_builds_are_deterministic(path: Path) -> None:
    torch.manual_seed(123)
    a = bg.build_model(path, device="meta")
    b = bg.build_model(path, device="meta")
    assert list(a.state_dict()) == list(b.state_dict())
    torch.manual_seed(7)
    a = _shrunk(path)
    torch.manual_seed(7)
    b = _shrunk(path)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("path", SPECS, ids=ids)
def test_feature_info_matches_features_only_output(path: Path) -> None:
    model = bg.build_model(path, features_only=True, overrides={"depths": [1, 1, 1, 1]}).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 224, 224))
    assert isinstance(feats, list)
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in model.feature_info]
    assert [224 // f.shape[-1] for f in feats] == [i["reduction"] for i in model.feature_info]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
