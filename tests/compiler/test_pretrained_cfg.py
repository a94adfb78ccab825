"""pretrained_cfg: the data config timm's tools read (``timm.data.resolve_data_config(model=...)``) is the twin's
for every reference spec that has one, and the pooled size, first convolution and classifier the graph gives are
the twin's (names mapped through the spec's rename rules)."""

from __future__ import annotations

import pytest

import blockgraph as bg
from blockgraph.compiler.weights import _twin_rules, rename_key
from tests.support.timm_oracle import create_timm, import_timm

pytestmark = pytest.mark.timm

TWINNED = [name for name in bg.list_models() if (spec := bg.analyze(name).spec).twin is not None and spec.twin.timm]


@pytest.fixture(scope="module", autouse=True)
def _timm():
    import_timm()


@pytest.mark.parametrize("name", TWINNED)
def test_the_data_config_is_the_twins(name: str) -> None:
    from timm.data import resolve_data_config

    ours = bg.create_model(name, device="meta")
    twin = create_timm(ours.spec.twin.timm, device="meta")
    assert resolve_data_config(model=ours) == resolve_data_config(model=twin)
    ours_cfg, twin_cfg = ours.pretrained_cfg, dict(twin.pretrained_cfg)
    assert ours.default_cfg == ours_cfg
    for key in ("input_size", "pool_size", "num_classes", "test_input_size"):
        assert ours_cfg.get(key) == twin_cfg.get(key), key
    _, rules = _twin_rules(ours)

    def mapped(module: str | tuple[str, ...]) -> str | tuple[str, ...]:
        names = (module,) if isinstance(module, str) else module
        out = tuple(rename_key(f"{n}.weight", rules).removesuffix(".weight") for n in names)
        return out[0] if len(out) == 1 else out

    assert ours_cfg["first_conv"] == mapped(twin_cfg["first_conv"])
    assert ours_cfg["classifier"] == mapped(twin_cfg["classifier"])


def test_a_spec_without_data_has_imagenets() -> None:
    cfg = bg.build_model("deformable_encoder", overrides={"layers": 1}, device="meta").pretrained_cfg
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["input_size"] == (3, 640, 701) and cfg["classifier"] is None
