"""Build-time checks of blocks against their own rules (compiler/check.py): every block of every reference spec,
and custom blocks whose rules are off or whose code raises (a BlockError naming the node, exit 2, never an
internal error)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

import blockgraph as bg
from blockgraph import BlockSpec, register
from blockgraph.blocks import count
from blockgraph.compiler.check import check_blocks
from blockgraph.errors import BlockError
from blockgraph.spec import schema
from blockgraph.spec.schema import shared_ref
from tests.conftest import SPECS
from tests.support.specs import shrunk


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_block_of_every_reference_spec_agrees_with_its_rules(path: Path) -> None:
    """The check compile_model runs for custom blocks, over every node and shared module of the built-in ones."""
    inference = bg.analyze(path, overrides=shrunk(path)).inference
    graph = inference.graph
    assert check_blocks(inference) == len(graph.shared) + len(graph) - len(graph.spec.input_specs())  # not inputs


# ------------------------------------------------------------------------------------------------ custom blocks


class Proj(nn.Module):
    """The module half of ``check_proj``: a linear map of the channels, raising in forward when told to."""

    def __init__(self, dim: int, dim_out: int, fail: bool = False, device=None, dtype=None):
        super().__init__()
        self.fc = nn.Linear(dim, dim_out, device=device, dtype=dtype)
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("the custom forward failed")
        return self.fc(x)


class ProjSpec(BlockSpec):
    """A linear map of the channels of tokens, with knobs that break its rules (for these tests)."""

    op: Literal["check_proj"]
    dim: int
    dim_out: int
    params_off: int = 0
    """Added to what params() says."""
    grows: int = 0
    """Added to the output channels the shape rule says."""
    raises_in: Literal["nothing", "infer", "params", "build", "forward"] = "nothing"

    def infer(self, ctx, x):
        if self.raises_in == "infer":
            return 1 / 0
        ctx.expect(x, layout="tokens", channels=self.dim)
        return x.with_(channels=self.dim_out + self.grows)

    def params(self, x):
        if self.raises_in == "params":
            raise KeyError("dim_hidden")
        return count.linear(self.dim, self.dim_out) + self.params_off

    def build(self, ctx, x):
        if self.raises_in == "build":
            raise TypeError("Proj() got an unexpected keyword argument 'bias'")
        return Proj(self.dim, self.dim_out, self.raises_in == "forward", **ctx.dd)


class Mix(nn.Module):
    """The module half of ``check_mix``: a shared position encoding at the token grid, then two outputs."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, size: tuple[int, int], cpe: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        y = cpe(x, size) * self.scale
        return y, y.mean(1)


class MixSpec(BlockSpec):
    """Two outputs, the token grid and a shared module: the generated forward's whole calling convention."""

    op: Literal["check_mix"]
    dim: int
    cpe: shared_ref("conv_pos_enc", "check_cpe")  # type: ignore[valid-type]
    needs_size = True

    def output_ports(self):
        return ("tokens", "pooled")

    def infer(self, ctx, x):
        x = ctx.shared("cpe").infer(x)
        return {"tokens": x, "pooled": bg.types.TensorType.vector(self.dim)}

    def params(self, x):
        return self.dim

    def build(self, ctx, x):
        return Mix(self.dim, **ctx.dd)


class Cpe(nn.Module):
    """The module half of ``check_cpe``: ``x + DWConv(x)`` on the token grid."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        return x + self.proj(x.transpose(1, 2).reshape(B, C, *size)).flatten(2).transpose(1, 2)


class CpeSpec(BlockSpec):
    """A shared position encoding whose params() rule may forget the conv's bias."""

    op: Literal["check_cpe"]
    dim: int
    forgets_bias: bool = False
    needs_size = True

    def infer(self, ctx, x):
        return x

    def params(self, x=None):
        return count.conv(self.dim, self.dim, 3, groups=self.dim) - (self.dim if self.forgets_bias else 0)

    def build(self, ctx, x=None):
        return Cpe(self.dim, **ctx.dd)


@pytest.fixture
def custom(monkeypatch):
    """Register the test blocks for one test."""
    monkeypatch.setattr(schema, "_REGISTRY", dict(schema._REGISTRY))
    monkeypatch.setattr(schema, "_CACHE", {})
    for cls in (ProjSpec, MixSpec, CpeSpec):
        register(cls)


SPEC = """name: checked
input: {{channels: 3, size: [32, 32]}}
shared:
  cpe: {{op: conv_pos_enc, dim: 8}}
blocks:
  - {{name: stem, op: conv_bn, dim_out: 8, kernel: 3, stride: 2}}
  - {{name: tokens, op: map_to_tokens}}
  - {{name: mix, op: check_mix, dim: 8, cpe: cpe}}
  - {{name: proj, op: check_proj, from: mix.tokens, dim: 8, dim_out: 16{knobs}}}
  - {{name: mlp, op: mlp, dim: {mlp}}}
outputs: {{out: mlp, pooled: mix.pooled}}
"""


def test_custom_blocks_that_keep_their_rules_build_and_run(custom) -> None:
    model = bg.build_model(SPEC.format(knobs="", mlp=16))
    out = model(torch.randn(2, 3, 32, 32))
    assert out["out"].shape == (2, 256, 16) and out["pooled"].shape == (2, 8)


BROKEN = [
    # (knobs, the mlp's width, the step that fails, the error)
    (", params_off: 1", 16, "build", r"node 'proj' \(check_proj\): params\(\) says 145 parameters, the module has 144"),
    (
        ", grows: 1",
        17,
        "build",
        r"node 'proj' \(check_proj\): the shape rule says output 2x256x17, the module returns 2x256x16 "
        r"\(at input 32x32, batch 2\)",
    ),
    (
        ", raises_in: infer",
        16,
        "validate",
        r"custom block 'proj' \(op check_proj, \S*test_check\.ProjSpec\) raised ZeroDivisionError: "
        r"division by zero in its shape rule",
    ),
    (", raises_in: params", 16, "validate", r"raised KeyError: 'dim_hidden' in its params\(\) rule"),
    (", raises_in: build", 16, "build", r"raised TypeError: Proj\(\) got an unexpected keyword argument 'bias' in its"),
    (", raises_in: forward", 16, "build", r"raised RuntimeError: the custom forward failed in its module's forward"),
]


@pytest.mark.parametrize(("knobs", "mlp", "step", "match"), BROKEN, ids=[b[0][2:] for b in BROKEN])
def test_a_custom_block_that_breaks_its_rules_is_a_block_error(
    custom, tmp_path: Path, run_cli, knobs: str, mlp: int, step: str, match: str
) -> None:
    spec = tmp_path / "checked.yaml"
    spec.write_text(SPEC.format(knobs=knobs, mlp=mlp))
    if step == "build":
        bg.validate(spec)  # the rules agree with each other: only the module shows they are wrong
    with pytest.raises(BlockError, match=match) as info:
        bg.build_model(spec)
    assert (info.value.file, info.value.line, info.value.column, info.value.node) == (str(spec), 9, 5, "proj")
    assert info.value.hint.startswith("fix ")
    code, out, err = run_cli("build", spec)
    assert code == 2 and out == ""
    assert err.startswith(f"{spec}:9:5: error: ") and "\nhint: fix " in err
    assert "internal error" not in err and "Traceback" not in err


def test_a_wrong_port_count_is_a_block_error(custom, monkeypatch) -> None:
    monkeypatch.setattr(Mix, "forward", lambda self, x, size, cpe: cpe(x, size))
    with pytest.raises(BlockError, match=r"the shape rule says outputs a tuple of 2 \(tokens, pooled\), the module "):
        bg.build_model(SPEC.format(knobs="", mlp=16))


def test_a_rule_that_disagrees_with_its_output_ports_is_a_block_error(custom, monkeypatch) -> None:
    monkeypatch.setattr(MixSpec, "output_ports", lambda self: ("tokens",))
    with pytest.raises(
        BlockError, match=r"returned ports \['tokens', 'pooled'\], but output_ports\(\) is \['tokens'\]"
    ):
        bg.validate(SPEC.format(knobs="", mlp=16))


def test_a_custom_shared_module_is_checked_too(custom) -> None:
    text = SPEC.format(knobs="", mlp=16).replace("op: conv_pos_enc", "op: check_cpe, forgets_bias: true")
    with pytest.raises(
        BlockError, match=r"shared module 'cpe' \(check_cpe\): params\(\) says 72 parameters, the module"
    ):
        bg.build_model(text)
    assert bg.build_model(text.replace("forgets_bias: true", "forgets_bias: false")).get_submodule("cpe")


def test_builtin_blocks_are_not_checked_at_build(monkeypatch) -> None:
    import blockgraph.compiler.check as check

    checked = []
    monkeypatch.setattr(check, "check_blocks", lambda inference, names: checked.append(names))
    bg.build_model(SPECS[0].parent / "coat_lite_tiny.yaml", overrides={"depths": [1, 1, 1, 1]}, device="meta")
    assert checked == []
