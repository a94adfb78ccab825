"""Custom blocks from user code: the ``@register`` decorator, a spec's ``imports:``, ``--plugin`` and
``load_plugin``, and the ``blockgraph.blocks`` entry point group.

The entry point tests install a fake distribution into ``tmp_path`` (a module plus ``*.dist-info`` with
``METADATA`` and ``entry_points.txt``) and put it on ``sys.path``: exactly what ``pip install`` leaves behind.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blockgraph as bg
from blockgraph.spec import plugins, schema
from tests.conftest import ROOT

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
def site(tmp_path: Path, plugin_sandbox):
    """A directory on sys.path for fake distributions; the registry and sys.modules are restored afterwards."""
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))


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
    assert "channel_affine" in plugins.registry()  # listing the registry loads plugins too
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
    assert (info.value.pos.file, info.value.pos.line) == (str(spec), 6)  # where the spec uses the op nobody had
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
        plugins.registry()


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


# ------------------------------------------------------------------------------------ imports:, --plugin, load_plugin

SPEC_HALF = '''
"""A custom block in two halves, as a user writes it: this spec half is torch-free, the module is in the sibling
file affine_layers.py."""
from typing import Literal

from blockgraph import BlockSpec, register


@register
class FileAffineSpec(BlockSpec):
    """y = x * scale + shift, per channel, on an image map."""

    op: Literal["file_affine"]
    dim: int
    """Channels of the map."""

    def infer(self, ctx, x):
        ctx.expect(x, layout="image", channels=self.dim)
        return x

    def params(self, x):
        return 2 * self.dim

    def build(self, ctx, x):
        from .affine_layers import FileAffine

        return FileAffine(self.dim, **ctx.dd)
'''

MODULE_HALF = """
import torch
from torch import nn


class FileAffine(nn.Module):
    def __init__(self, dim, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1, dim, 1, 1), 3.0, device=device, dtype=dtype))
        self.shift = nn.Parameter(torch.zeros(1, dim, 1, 1, device=device, dtype=dtype))

    def forward(self, x):
        return x * self.scale + self.shift
"""

BODY = """name: plugged
input: {channels: 3, size: [32, 32]}
blocks:
  - {name: stem, op: conv_bn, dim_out: 8, kernel: 3, stride: 2}
  - {name: affine, op: file_affine, dim: 8}
outputs: {out: affine}
"""


def _plugin_files(directory: Path) -> Path:
    """The two halves of the ``file_affine`` block in ``directory``; returns the spec half."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "affine_layers.py").write_text(MODULE_HALF)
    (directory / "affine.py").write_text(SPEC_HALF)
    return directory / "affine.py"


def _file_module(path: Path) -> str:
    import hashlib

    directory = str(path.resolve().parent)
    return f"blockgraph_plugins.d_{hashlib.sha256(directory.encode()).hexdigest()[:12]}.{path.stem}"


def test_imports_a_file_relative_to_the_spec_with_its_siblings(site: Path, tmp_path_factory, monkeypatch) -> None:
    plugin = _plugin_files(site / "blocks")
    spec = site / "specs" / "model.yaml"
    spec.parent.mkdir()
    spec.write_text("imports: [../blocks/affine.py]\n" + BODY)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # relative to the spec, not to the current directory
    assert bg.validate(spec).outputs == {"out": "1x8x16x16"}
    name = _file_module(plugin)
    module = sys.modules[name]
    assert schema.registered()["file_affine"].__module__ == name
    model = bg.build_model(spec)
    assert type(model.get_submodule("affine")).__module__ == name.replace(".affine", ".affine_layers")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.get_submodule("stem")(x) * 3.0)
    bg.validate(spec)  # loaded once, however many specs import it
    assert sys.modules[name] is module and bg.load_plugin(plugin) is module
    assert bg.analyze(spec).expanded.standalone()["imports"] == [str(plugin.resolve())]


def test_imports_a_module_by_name(site: Path) -> None:
    (site / "bgplug_named.py").write_text(PLUGIN)
    report = bg.validate("imports: [bgplug_named]\n" + SPEC)
    assert report.outputs == {"out": "1x8x16x16"}
    assert "bgplug_named" in sys.modules
    assert bg.load_plugin("bgplug_named") is sys.modules["bgplug_named"]


def test_imports_are_inherited_through_extends_and_variants(site: Path) -> None:
    plugin = _plugin_files(site / "family")
    (site / "bgplug_named.py").write_text(PLUGIN)
    (site / "bgplug_extra.py").write_text("")
    (site / "family" / "base.yaml").write_text(
        "imports: [./affine.py]\nvariants: {big: {imports: [bgplug_extra]}}\n" + BODY
    )
    child = site / "child" / "model.yaml"
    child.parent.mkdir()
    child.write_text("extends: ../family/base.yaml\nimports: [bgplug_named, ../family/affine.py]\nname: child\n")
    expanded = bg.analyze(child).expanded
    assert [i.name for i in expanded.imports] == [str(plugin.resolve()), "bgplug_named"]  # the parent's first, once
    assert [(i.pos.file, i.pos.line) for i in expanded.imports] == [
        (str(site / "family" / "base.yaml"), 1),
        (str(child), 2),
    ]
    assert expanded.standalone()["imports"] == [str(plugin.resolve()), "bgplug_named"]
    names = [i.name for i in bg.analyze(child, variant="big").expanded.imports]
    assert names == [str(plugin.resolve()), "bgplug_named", "bgplug_extra"]


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("3", r"`imports:` entry 3 is neither a module name nor a .py file"),
        ("my-pkg", r"`imports:` entry 'my-pkg' is neither a module name nor a .py file"),
    ],
)
def test_malformed_imports_are_spec_errors(entry: str, match: str) -> None:
    with pytest.raises(bg.SpecError, match=match) as info:
        bg.analyze(f"imports: [{entry}]\n" + BODY)
    assert (info.value.line, info.value.column) == (1, 11)
    with pytest.raises(bg.SpecError, match="`imports:` takes a list"):
        bg.analyze("imports: bgplug_named\n" + BODY)


BROKEN = [
    # (file written into the site, the entry, the error)
    (None, "bgplug_missing.blocks", r"no module named 'bgplug_missing'"),
    (None, "./missing.py", r"no such file: .*missing\.py"),
    (("pkgdir/__init__.py", ""), "./pkgdir", r"pkgdir is a directory"),
    (("notes.txt", ""), "./notes.txt", r"notes\.txt is not a Python file"),
    (
        ("bgplug_raises.py", "raise ValueError('bad weights path')\n"),
        "bgplug_raises",
        "importing it raised ValueError: bad weights",
    ),
    (("raises.py", "raise ValueError('bad weights path')\n"), "./raises.py", "raised ValueError: bad weights path"),
    (("exits.py", "import sys\nsys.exit(3)\n"), "./exits.py", r"importing it called sys\.exit\(3\)"),
    (("syntax.py", "x = 1 +\n"), "./syntax.py", "raised SyntaxError"),
    (("deps.py", "import torch_magic\n"), "./deps.py", "raised ModuleNotFoundError: No module named 'torch_magic'"),
    (
        ("twice.py", PLUGIN.replace('Literal["channel_affine"]', 'Literal["conv_bn"]')),
        "./twice.py",
        "raised TypeError: op 'conv_bn' is already registered by blockgraph.blocks.conv.ConvBnSpec",
    ),
]


def _write(site: Path, file: tuple[str, str] | None) -> None:
    if file is not None:
        (site / file[0]).parent.mkdir(exist_ok=True)
        (site / file[0]).write_text(file[1])


@pytest.mark.parametrize(("file", "entry", "match"), BROKEN, ids=[b[1] + "-" + b[2][:12] for b in BROKEN])
def test_a_broken_import_is_a_plugin_error_at_its_entry(site: Path, run_cli, file, entry: str, match: str) -> None:
    _write(site, file)
    spec = site / "spec.yaml"
    spec.write_text(f"imports:\n  - {entry}\n" + SPEC)
    with pytest.raises(bg.PluginError, match=f"plugin '{entry}': .*{match}") as info:
        bg.validate(spec)
    assert (info.value.file, info.value.line, info.value.column) == (str(spec), 2, 5)
    assert info.value.hint
    code, out, err = run_cli("validate", spec)
    assert code == 2 and out == ""
    assert err.startswith(f"{spec}:2:5: error: plugin '{entry}': ") and "\nhint: " in err and "Traceback" not in err


@pytest.mark.parametrize(("file", "entry", "match"), BROKEN, ids=[b[1] + "-" + b[2][:12] for b in BROKEN])
def test_a_broken_plugin_option_is_a_plugin_error(site: Path, run_cli, monkeypatch, file, entry: str, match: str):
    _write(site, file)
    monkeypatch.chdir(site)  # --plugin files are relative to the current directory
    code, out, err = run_cli("list", "--plugin", entry)
    assert code == 2 and out == ""
    assert err.startswith(f"<command line>: error: --plugin {entry}: ") and "Traceback" not in err
    assert re.search(match, err), err
    with pytest.raises(bg.PluginError, match=match):
        bg.load_plugin(entry)


def test_two_files_registering_one_op_is_a_plugin_error(site: Path) -> None:
    _plugin_files(site / "a")
    _plugin_files(site / "b")
    bg.load_plugin(site / "a" / "affine.py")
    with pytest.raises(bg.PluginError, match="op 'file_affine' is already registered by blockgraph_plugins.d_"):
        bg.load_plugin(site / "b" / "affine.py")


COMMANDS = {
    "validate": ("validate", "{spec}"),
    "build": ("build", "{spec}"),
    "summary": ("summary", "{spec}"),
    "graph": ("graph", "{spec}"),
    "export": ("export", "{spec}", "--onnx", "{dir}/model.onnx"),
    "schema": ("schema",),
    "docs": ("docs",),
    "list": ("list", "--ops"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_takes_plugin_options(site: Path, run_cli, monkeypatch, command: str) -> None:
    _plugin_files(site / "blocks")
    (site / "spec.yaml").write_text(BODY)  # no imports: the ops come from --plugin
    monkeypatch.chdir(site)
    argv = [a.format(spec="spec.yaml", dir=site) for a in COMMANDS[command]]
    if command not in ("schema", "docs", "list"):
        code, _, err = run_cli(*argv)
        assert code == 2 and "unknown op 'file_affine'" in err
    code, out, err = run_cli(*argv, "--plugin", "blocks/affine.py", "--plugin", "json")  # a file, a module
    assert code == 0, err
    assert _file_module(site / "blocks" / "affine.py") in sys.modules
    assert command in ("validate", "export") or "file_affine" in out


def test_a_spec_that_may_not_import_refuses_modules_not_loaded(site: Path) -> None:
    (site / "bgplug_later.py").write_text(PLUGIN)
    text = "imports: [bgplug_later]\n" + SPEC
    with pytest.raises(bg.PluginError, match="imports the plugin 'bgplug_later', which is not loaded") as info:
        bg.analyze(text, allow_imports=False)
    assert "`--plugin bgplug_later`" in info.value.hint and "`import bgplug_later`" in info.value.hint
    assert "bgplug_later" not in sys.modules
    bg.load_plugin("bgplug_later")
    assert bg.analyze(text, allow_imports=False).spec.name == "plugged"


def test_a_checkpoint_never_imports_and_loads_once_its_plugin_is(site: Path, run_cli) -> None:
    plugin = _plugin_files(site / "blocks")
    spec = site / "model.yaml"
    spec.write_text("imports: [./blocks/affine.py]\n" + BODY)
    code, _, err = run_cli("build", spec, "--out", site / "model.pt")
    assert code == 0, err
    model = bg.load(site / "model.pt")  # in this process the plugin is loaded
    assert type(model.get_submodule("affine")).__name__ == "FileAffine"
    (site / "layer.pkl").write_bytes(pickle.dumps(model.get_submodule("affine")))
    script = f"""
import pickle, sys
import blockgraph as bg

try:
    bg.load({str(site / "model.pt")!r})
except bg.PluginError as e:
    print(e.format())
assert not any(m.startswith("blockgraph_plugins") for m in sys.modules), "the checkpoint imported code"
bg.load_plugin({str(plugin)!r})
model = bg.load({str(site / "model.pt")!r})
layer = pickle.loads(open({str(site / "layer.pkl")!r}, "rb").read())
assert type(layer) is type(model.get_submodule("affine")), type(layer)
print("loaded")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's blockgraph, wherever the interpreter's points
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd="/", env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    refused, loaded = result.stdout.split("\nhint: ")
    assert refused.startswith(
        f"{site / 'model.pt'}: error: the spec imports the plugin {str(plugin.resolve())!r}, which is not loaded"
    )
    assert f"`--plugin {plugin.resolve()}` on the command line" in loaded
    assert f"`blockgraph.load_plugin({str(plugin.resolve())!r})` in Python" in loaded
    assert loaded.endswith("\nloaded\n")


def test_an_exception_in_a_plugin_files_rule_names_the_file(site: Path, run_cli) -> None:
    plugin = _plugin_files(site)
    plugin.write_text(SPEC_HALF.replace("ctx.expect(x,", "ctx.expect(x, width=self.dim,"))
    spec = site / "spec.yaml"
    spec.write_text("imports: [./affine.py]\n" + BODY)
    message = (
        f"custom block 'affine' (op file_affine, FileAffineSpec of {plugin.resolve()}) raised TypeError: "
        "InferContext.expect() got an unexpected keyword argument 'width' in its shape rule"
    )
    with pytest.raises(bg.BlockError) as info:
        bg.validate(spec)
    assert info.value.message == message and (info.value.line, info.value.node) == (6, "affine")
    code, _, err = run_cli("validate", spec)
    assert code == 2 and err.startswith(f"{spec}:6:5: error: {message}\nhint: fix the block's code")
