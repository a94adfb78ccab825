"""One battery over every reference spec in specs/: build, static shapes == runtime shapes (rejected sizes rejected
by both validate and forward), gradients, determinism, feature_info."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import blockgraph as bg
from tests.conftest import ROOT, SPECS
from tests.support.specs import runtime_shapes, shrunk, small_size, static_shapes

SIZES = [(224, 224), (480, 640), (256, 320), (250, 333)]
ids = [p.stem for p in SPECS]


def _all_outputs(path: Path) -> list[str]:
    analysis = bg.analyze(path)
    return list(analysis.graph.outputs) + list(analysis.graph.features)


def _shrunk(path: Path, **kwargs) -> torch.nn.Module:
    """The spec with every depth variable at 1: the same blocks and shape rules, a fraction of the compute."""
    kwargs.setdefault("outputs", _all_outputs(path))
    return bg.build_model(path, overrides=shrunk(path), **kwargs)


def _flat(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _flat(v)]


@pytest.mark.parametrize("path", SPECS, ids=ids)
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_static_shapes_equal_runtime_shapes(path: Path, size: tuple[int, int]) -> None:
    """At four sizes (rejected ones included), every depth at most 2: the same blocks and shape rules as the full
    model, alternating blocks included (the full depth runs at two sizes below)."""
    _check_shapes(path, size, shrunk(path, most=2))


@pytest.mark.parametrize("path", SPECS, ids=ids)
def test_static_shapes_at_two_accepted_sizes(path: Path) -> None:
    """Every spec, whatever its rules, at its default size and at another size it states it accepts."""
    analysis = bg.analyze(path)
    default = tuple(analysis.spec.input.size)
    sizes = analysis.inference.acceptance.sizes
    other = []
    for symbol, base, grow in (("H", default[0], 128), ("W", default[1], 64)):  # a different, non-square size
        below, above = sizes[symbol].nearest(base + grow)
        other.append(above if above is not None and above <= base + 2 * grow else below)
    assert tuple(other) != default
    for size in (default, tuple(other)):
        assert analysis.inference.acceptance.contains({"H": size[0], "W": size[1]})
        _check_shapes(path, size)


def _check_shapes(path: Path, size: tuple[int, int], overrides: dict | None = None) -> None:
    h, w = size
    analysis = bg.analyze(path, overrides=overrides)
    if not analysis.inference.acceptance.contains({"H": h, "W": w}):
        # A size the spec rejects is rejected before allocation, and by the forward with the same error.
        with pytest.raises(bg.ShapeError, match=f"input {h}x{w}"):
            bg.validate(path, input_size=(h, w), overrides=overrides)
        model = bg.build_model(analysis, device="meta")
        with pytest.raises(bg.ShapeError, match=f"input {h}x{w}"):
            model(torch.empty(1, 3, h, w, device="meta"))
        return
    torch.manual_seed(0)
    model = bg.build_model(analysis, outputs=_all_outputs(path)).eval()
    expected = static_shapes(model, size, batch=1)
    with torch.no_grad():
        seen, out = runtime_shapes(model, lambda: model(torch.randn(1, 3, h, w)))
    assert set(seen) == set(expected)
    mismatched = {n: (seen[n], expected[n]) for n in expected if seen[n] != expected[n]}
    assert not mismatched
    assert all(torch.isfinite(v).all() for v in _flat(out))


def test_every_family_is_checked_at_accepted_sizes_other_than_its_default() -> None:
    """The battery above must not degenerate into rejection checks: CoaT at 480x640 and 256x320, CoaT-Lite at
    every size."""
    for name, sizes in {"coat_tiny": [(480, 640), (256, 320)], "coat_lite_tiny": SIZES}.items():
        acceptance = bg.analyze(ROOT / "specs" / f"{name}.yaml").inference.acceptance
        assert all(acceptance.contains({"H": h, "W": w}) for h, w in sizes), name


def test_coat_lite_small_seed_shapes() -> None:
    """ARCHITECTURES.md 2.2: coat_lite_small on 1x3x480x640."""
    path = ROOT / "specs" / "coat_lite_small.yaml"
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
    """One training step from the real init gives every parameter a finite gradient; once the parameters leave the
    init (some inits zero a projection, e.g. Deformable-DETR's offsets, which stops gradients for a step), every
    gradient is non-zero: every parameter is connected to the outputs. The input is the smallest accepted size of at
    least 64 per side: on a 1x1 map some blocks are identically zero (PoolFormer's mixer, a pool minus its input)."""
    torch.manual_seed(0)
    model = _shrunk(path).train()
    x = torch.randn(2, 3, *small_size(path))
    sum(v.float().pow(2).mean() for v in _flat(model(x))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
            p.grad = None
    sum(v.float().pow(2).mean() for v in _flat(model(x))).backward()
    zero = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not zero


@pytest.mark.parametrize("path", SPECS, ids=ids)
def test_builds_are_deterministic(path: Path) -> None:
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
    analysis = bg.analyze(path)
    if not analysis.graph.features:
        with pytest.raises(bg.BlockgraphError, match="declares no `features:`"):
            _shrunk(path, outputs=None, features_only=True)
        return
    model = _shrunk(path, outputs=None, features_only=True).eval()
    strides = [o.spec.stride for o in analysis.graph.features.values()]
    step = math.lcm(*strides)  # the first accepted size that every stride divides
    h = w = next(
        k * step for k in range(1, 64) if analysis.inference.acceptance.contains({"H": k * step, "W": k * step})
    )
    with torch.no_grad():
        feats = model(torch.randn(1, 3, h, w))
    assert isinstance(feats, list)
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in model.feature_info]
    assert [(h // f.shape[-2], w // f.shape[-1]) for f in feats] == [(i["reduction"],) * 2 for i in model.feature_info]
    assert [i["reduction"] for i in model.feature_info] == [o.spec.stride for o in analysis.graph.features.values()]


@pytest.mark.parametrize("path", SPECS, ids=ids)
def test_accepted_sizes_are_exactly_those_torch_can_run(path: Path) -> None:
    """With our input check switched off, a meta-device forward succeeds at exactly the sizes validate accepts:
    the statement of accepted sizes is checked against torch itself, not against our own check."""
    import random

    # eval: in training, BatchNorm also needs more than one value per channel (batch x map > 1), a condition on
    # the batch, not on the input size
    model = bg.build_model(path, device="meta", outputs=_all_outputs(path)).eval()
    acceptance = model.inference.acceptance
    model._reject = lambda x: None
    rng = random.Random(path.stem)
    sizes = [(rng.randint(8, 700), rng.randint(8, 700)) for _ in range(10)]
    sizes += [tuple(e) for e in acceptance.examples(2)] + [tuple(model.spec.input.size)]
    for h, w in sizes:
        accepted = acceptance.contains({"H": h, "W": w})
        try:
            with torch.no_grad():
                model(torch.empty(1, 3, h, w, device="meta"))
            ran = True
        except RuntimeError:
            ran = False
        assert ran == accepted, (h, w, accepted)


@pytest.mark.parametrize(
    ("name", "overrides", "node", "field", "expected"),
    [
        ("coat_lite_tiny", {"heads": [8, 8, 4, 8], "windows": [{3: 2, 5: 3, 7: 3}] * 2 + [{3: 2, 5: 2}] + [{3: 8}]},
         "stage3.blocks.0", "heads", [8, 8, 4, 8]),
        ("coat_lite_tiny", {"mlp_ratios": 4}, "stage1.blocks.0", "mlp_ratio", [4, 4, 4, 4]),
        ("mpvit_tiny", {"mlp_ratio": [2, 2, 4, 4], "heads": [8, 8, 8, 4], "windows": [{3: 2, 5: 3, 7: 3}] * 3 + [{3: 4}]},
         "stage1.path0.layers.0", "mlp_ratio", [2, 2, 4, 4]),
        ("swin_tiny_patch4_window7_224", {"window": [7, 7, 14, 7], "mlp_ratio": [4, 4, 3, 4]},
         "layers2.blocks.1", "window", [7, 7, 14, 7]),
    ],
)  # fmt: skip
def test_families_take_per_stage_values_or_one_for_all(name, overrides, node, field, expected) -> None:
    """Heads, CRPE windows, windows and MLP ratios: a scalar for every stage (the default), or a list, one per stage."""
    analysis = bg.analyze(bg.api.spec_path(name), overrides=overrides)
    nodes = analysis.graph.nodes
    stage, _, rest = node.partition(".")
    got = [getattr(nodes[f"{stage[:-1]}{s}.{rest}"].spec, field) for s in _stage_numbers(name)]
    assert got == expected


def _stage_numbers(name: str) -> list[int]:
    return [0, 1, 2, 3] if name.startswith("swin") else [1, 2, 3, 4]
