"""Custom blocks from user code: the ``@register`` decorator and the ``blockgraph.blocks`` entry point group.

The entry point tests install a fake distribution into ``tmp_path`` (a module plus ``*.dist-info`` with
``METADATA`` and ``entry_points.txt``) and put it on ``sys.path``: exactly what ``pip install`` leaves behind.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

import blockgraph as bg
from blockgraph.spec import schema

PLUGIN = '''
"""A block plugin: a learned per-channel affine map (what a user's package would ship)."""
from typing import Literal

from blockgraph import BlockSpec, register


@register
class ChannelAffineSpec(BlockSpec):
    """y = x * scale + shift, per channel, on an image map."""

    op: Literal["channel_affine"]
    dim: int
    """Channels of the map."""
    scale: float = 2.0
    """Initial scale."""

    def infer(self, ctx, x):
        ctx.expect(x, layout="image", channels=self.dim)
        return x

    def build(self, ctx, x):
        import torch
        from torch import nn

        class ChannelAffine(nn.Module):
            def __init__(self, dim, scale):
                super().__init__()
                self.scale = nn.Parameter(torch.full((1, dim, 1, 1), scale))
                self.shift = nn.Parameter(torch.zeros(1, dim, 1, 1))

            def forward(self, x):
                return x * self.scale + self.shift

        return ChannelAffine(self.dim, self.scale)
'''

SPEC = """
name: plugged
input: {channels: 3, size: [32, 32]}
blocks:
  - {name: stem, op: conv_bn, dim_out: 8, kernel: 3, stride: 2}
  - {name: affine, op: channel_affine, dim: 8, scale: 3.0}
outputs: {out: affine}
"""


def _install(root: Path, module: str, source: str, entry: str) -> None:
    """Write a distribution ``fake-<module>`` the way pip installs one: the module and its dist-info."""
    (root / f"{module}.py").write_text(source)
    info = root / f"fake_{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-{module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[blockgraph.blocks]\n{entry}\n")


@pytest.fixture
def site(tmp_path: Path):
    """A directory on sys.path for fake distributions; the registry and sys.modules are restored afterwards."""
    saved = dict(schema._REGISTRY)
    modules = set(sys.modules)
    sys.path.insert(0, str(tmp_path))
    schema._reset_plugins()
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in set(sys.modules) - modules:
            if name.startswith("bgplug_"):
                del sys.modules[name]
        for op in set(schema._REGISTRY) - set(saved):
            schema.unregister(op)
        schema._reset_plugins()


def test_entry_point_block_validates_builds_and_runs(site: Path) -> None:
    _install(site, "bgplug_affine", PLUGIN, "channel_affine = bgplug_affine")
    assert "channel_affine" not in schema._REGISTRY
    assert "bgplug_affine" not in sys.modules
    report = bg.validate(SPEC, input_size=(3, 32, 32))  # the unknown op triggers the lazy plugin load
    assert "channel_affine" in schema._REGISTRY
    assert report.outputs == {"out": "1x8x16x16"}
    model = bg.build_model(SPEC)
    assert model.get_submodule("affine").scale.flatten().tolist() == [3.0] * 8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.get_submodule("affine").shift.fill_(0.5)
        expected = model.get_submodule("stem")(x) * 3.0 + 0.5
        assert torch.equal(model(x), expected)
    assert "self.affine(stem)" in model.code


def test_entry_point_naming_a_class_is_registered(site: Path) -> None:
    source = PLUGIN.replace("@register\n", "")  # the entry point itself names the class
    _install(site, "bgplug_cls", source, "channel_affine = bgplug_cls:ChannelAffineSpec")
    assert "channel_affine" in schema.registry()  # listing the registry loads plugins too
    assert bg.validate(SPEC).outputs == {"out": "1x8x16x16"}


def test_plugins_are_not_loaded_for_builtin_ops(site: Path) -> None:
    _install(site, "bgplug_broken", "raise ImportError('no module named torch_magic')\n", "magic = bgplug_broken")
    report = bg.validate(Path(__file__).parents[2] / "specs" / "coat_lite_tiny.yaml")
    assert report.name == "coat_lite_tiny"
    assert "bgplug_broken" not in sys.modules


def test_broken_plugin_is_a_blockgraph_error_naming_the_entry_point(site: Path, run_cli) -> None:
    _install(site, "bgplug_broken", "raise ImportError('no module named torch_magic')\n", "magic = bgplug_broken")
    spec = site / "spec.yaml"
    spec.write_text(SPEC)
    with pytest.raises(bg.PluginError) as info:
        bg.validate(spec)
    message = info.value.message
    assert "entry point 'magic = bgplug_broken' (group blockgraph.blocks, from fake-bgplug_broken)" in message
    assert "ImportError: no module named torch_magic" in message
    assert "fake-bgplug_broken" in info.value.hint
    code, out, err = run_cli("validate", spec)
    assert code == 2 and out == ""
    assert "failed to load: ImportError" in err and "Traceback" not in err
    code, _, err = run_cli("list", "--ops")  # listing the registry reports it too
    assert code == 2 and "entry point 'magic = bgplug_broken'" in err


@pytest.mark.parametrize(
    ("source", "entry", "match"),
    [
        ("VALUE = 3\n", "bad = bgplug_bad:VALUE", "names an object of type int, not a module or a BlockSpec subclass"),
        (
            PLUGIN.replace('Literal["channel_affine"]', 'Literal["conv_bn"]'),
            "bad = bgplug_bad",
            "op 'conv_bn' is already registered by blockgraph.blocks.conv.ConvBnSpec",
        ),
        ("x = 1 +\n", "bad = bgplug_bad", "SyntaxError"),
    ],
)
def test_bad_plugins(site: Path, source: str, entry: str, match: str) -> None:
    _install(site, "bgplug_bad", source, entry)
    with pytest.raises(bg.PluginError, match=match):
        schema.registry()


def test_unknown_op_is_still_reported_after_loading_plugins(site: Path) -> None:
    _install(site, "bgplug_affine", PLUGIN, "channel_affine = bgplug_affine")
    with pytest.raises(bg.SpecError, match="unknown op 'channel_afine'") as info:
        bg.validate(SPEC.replace("op: channel_affine", "op: channel_afine"))
    assert "channel_affine" in info.value.hint


def test_decorator_registers_from_user_code(site: Path) -> None:
    (site / "bgplug_mine.py").write_text(PLUGIN)  # a user's own module, no distribution, no entry point
    importlib.import_module("bgplug_mine")
    model = bg.build_model(SPEC)
    assert type(model.get_submodule("affine")).__name__ == "ChannelAffine"


def test_plugin_ops_are_in_the_editor_schema(site: Path) -> None:
    from blockgraph.spec.source_schema import source_schema

    _install(site, "bgplug_affine", PLUGIN, "channel_affine = bgplug_affine")
    definition = source_schema()["definitions"]["ChannelAffineSpec"]
    assert definition["properties"]["scale"]["description"] == "Initial scale."
    assert definition["required"] == ["op", "dim"]
