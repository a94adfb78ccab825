"""Blocks defined in a spec (``define:``): expansion, the graph of their parts, modules nested under their names,
libraries, and what is refused (the broken-spec table has the positions of the errors)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

import blockgraph as bg
from blockgraph.graph.render import render

DEFINE = """
define:
  mlp_pair:
    description: two MLPs, the second back to dim
    params: {dim: null, ratio: 2, hidden: "${dim * ratio}"}
    blocks:
      - {name: fc1, op: mlp, dim: "${dim}", dim_out: "${hidden}", mlp_ratio: 1}
      - {name: fc2, op: mlp, dim: "${hidden}", dim_out: "${dim}"}
  two_ways:
    inputs: [a, b]
    params: {dim: null}
    blocks:
      - {name: left, op: mlp_pair, dim: "${dim}", from: a}
      - {name: right, op: mlp, dim: "${dim}", from: b}
    outputs: {first: left, second: right}
"""

SPEC = f"""
name: defined
input: {{channels: 3, size: [32, 32]}}
{DEFINE}
stages:
  - name: s1
    blocks:
      - {{name: embed, op: conv_patch_embed, dim: 16, patch: 4}}
      - {{name: blocks, op: mlp_pair, dim: 16, ratio: "${{1 + rep}}", depth: 2}}
      - {{name: both, op: two_ways, dim: 16, from: [embed, blocks]}}
blocks:
  - {{name: head, op: cls_head, from: s1.both.second, dim: 16, num_classes: 3, pool: avg}}
  - {{name: head2, op: cls_head, from: s1.both.first, dim: 16, num_classes: 3, pool: avg}}
outputs: {{logits: head, other: head2}}
"""


def module_calls(code: str) -> list[str]:
    """The modules a generated forward calls, in order, each written from ``self`` (the local names it gives the
    containers it reaches more than once expanded)."""
    local: dict[str, str] = {}
    calls = []
    for line in code.splitlines()[1:]:
        target, sep, value = line.strip().partition(" = ")
        if not sep or not value.startswith(("self", "m_")):
            continue
        callee = value.split("(")[0]
        head = re.split(r"[.\[]", callee, maxsplit=1)[0]
        callee = local.get(head, head) + callee[len(head) :]
        if "(" in value:
            calls.append(callee)
        else:
            local[target] = callee
    return calls


def test_a_defined_block_is_its_parts_nested_under_its_name() -> None:
    torch.manual_seed(0)
    model = bg.build_model(SPEC).eval()
    graph = model.inference.graph
    assert set(graph.composites) == {"s1.blocks.0", "s1.blocks.1", "s1.both", "s1.both.left"}
    assert graph.composites["s1.both"].members == [
        "s1.both.left.fc1", "s1.both.left.fc2", "s1.both.right"
    ]  # fmt: skip
    keys = list(model.state_dict())
    assert "s1.blocks.1.fc1.fc1.weight" in keys and "s1.both.left.fc2.fc2.bias" in keys
    # the parameters: each repetition with its own `ratio` (1, then 2), the default `hidden` from the others
    assert model.get_submodule("s1.blocks.0.fc1.fc2").weight.shape == (16, 16)
    assert model.get_submodule("s1.blocks.1.fc1.fc2").weight.shape == (32, 16)
    report = bg.validate(SPEC)
    assert report.params == sum(p.numel() for p in model.parameters())
    # the dataflow: the repetitions in a chain, the composite's inputs and ports wired by their local names
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        m = model.get_submodule
        tokens = m("s1.embed")(x)
        chain = m("s1.blocks.1.fc2")(m("s1.blocks.1.fc1")(m("s1.blocks.0.fc2")(m("s1.blocks.0.fc1")(tokens))))
        left = m("s1.both.left.fc2")(m("s1.both.left.fc1")(tokens))
        torch.testing.assert_close(out["logits"], m("head")(m("s1.both.right")(chain)), rtol=0, atol=0)
        torch.testing.assert_close(out["other"], m("head2")(left), rtol=0, atol=0)
    # pickling rebuilds it from the expanded spec, where the uses are composite blocks
    with torch.no_grad():
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x)["logits"], out["logits"], rtol=0, atol=0)
    assert model.spec_data["stages"][0]["blocks"][1]["op"] == "block"


def test_summary_and_graph_show_the_parts_and_collapse_folds_them() -> None:
    model = bg.build_model(SPEC)
    table = model.summary(macs=False)
    assert "s1.both.left.fc1" in table and "s1.blocks.1.fc2" in table
    full = render(model.inference, "mermaid").decode()
    assert 'subgraph c_s1_both ["both (two_ways)"]' in full and '"left (mlp_pair)"' in full
    folded = render(model.inference, "mermaid", collapse=True).decode()
    assert "fc1" not in folded
    assert "blocks ×2<br/>mlp_pair" in folded and "both<br/>two_ways" in folded


def test_definitions_come_from_a_library_by_imports_or_extends(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "blocks.yaml").write_text(DEFINE)
    body = SPEC.replace(DEFINE, "")
    (tmp_path / "imports.yaml").write_text("imports: [lib/blocks.yaml]\n" + body)
    (tmp_path / "extends.yaml").write_text("extends: lib/blocks.yaml\n" + body)
    reference = bg.validate(SPEC).params
    for name in ("imports.yaml", "extends.yaml"):
        assert bg.validate(tmp_path / name).params == reference
    # the spec's own definition wins over the library's
    own = "define:\n  mlp_pair: {params: {dim: null, ratio: 1}, blocks: [{op: mlp, dim: '${dim}'}]}\n"
    (tmp_path / "own.yaml").write_text("imports: [lib/blocks.yaml]\n" + own + body)
    assert bg.validate(tmp_path / "own.yaml").params != reference
    (tmp_path / "missing.yaml").write_text("imports: [lib/nothing.yaml]\n" + body)
    with pytest.raises(bg.SpecError, match="block library that does not exist"):
        bg.validate(tmp_path / "missing.yaml")
    (tmp_path / "lib" / "a.yaml").write_text("imports: [b.yaml]\n")  # libraries that import each other
    (tmp_path / "lib" / "b.yaml").write_text("imports: [a.yaml]\n")
    (tmp_path / "cycle.yaml").write_text("imports: [lib/a.yaml]\n" + body)
    with pytest.raises(bg.SpecError, match=r"libraries form a cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        bg.validate(tmp_path / "cycle.yaml")


def test_a_use_may_also_be_a_merge_and_nest_deeper() -> None:
    spec = """
name: nested
input: {channels: 3, size: [32, 32]}
define:
  leaf: {params: {dim: null}, blocks: [{op: mlp, dim: "${dim}"}]}
  middle: {params: {dim: null}, blocks: [{name: a, op: leaf, dim: "${dim}"}, {name: b, op: leaf, dim: "${dim}"}]}
  top: {params: {dim: null}, blocks: [{name: m, op: middle, dim: "${dim}", depth: 2}]}
blocks:
  - {name: embed, op: conv_patch_embed, dim: 8, patch: 8}
  - {name: t, op: top, dim: 8}
outputs: {x: t}
"""
    model = bg.build_model(spec)
    assert "t.m.1.b.mlp.fc2.weight" in model.state_dict()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 16, 8)


@pytest.mark.parametrize(
    ("define", "message"),
    [
        ("define: [a]", "`define:` takes a mapping"),
        ("define: {Bad: {blocks: [{op: mlp, dim: 8}]}}", "not a snake_case name"),
        ("define: {block: {blocks: [{op: mlp, dim: 8}]}}", "'block' is reserved"),
        ("define: {b: {blocks: []}}", "the definition of 'b' has no blocks"),
        ("define: {b: {blokcs: [{op: mlp, dim: 8}]}}", "unknown key 'blokcs'"),
        ("define: {b: {params: [dim], blocks: [{op: mlp, dim: 8}]}}", "takes a mapping of names to defaults"),
        ("define: {b: {inputs: x, blocks: [{op: mlp, dim: 8}]}}", "takes a list of names"),
        ("define: {b: {output: x, outputs: {y: x}, blocks: [{op: mlp, dim: 8}]}}", "both `output:` and `outputs:`"),
        ("define: {a: {blocks: [{op: b}]}, b: {blocks: [{op: a}]}}", "uses itself: a -> b -> a"),
    ],
)
def test_malformed_definitions_are_refused(define: str, message: str) -> None:
    spec = f"name: x\n{define}\nblocks:\n  - {{op: a}}\n  - {{op: b}}\n"
    with pytest.raises(bg.SpecError, match=message):
        bg.validate(spec)


@pytest.mark.parametrize(
    ("document", "section"),
    [("docs/spec-language.md", "## Blocks defined in a spec"), ("README.md", "## Blocks in YAML")],
)
def test_the_examples_of_the_docs_build(document: str, section: str) -> None:
    from tests.conftest import ROOT

    text = (ROOT / document).read_text()
    part = text[text.index(section) :]
    start = part.index("```yaml\n") + len("```yaml\n")
    example = part[start : part.index("```", start)]
    model = bg.build_model(f"name: doc\ninput: {{channels: 96, size: [32, 32]}}\n{example}")
    assert model(torch.randn(1, 96, 32, 32)).shape == (1, 96, 32, 32)
    assert "stage0.blocks.2.mlp.fc1.weight" in model.state_dict()


def test_blocks_inside_a_definition_use_the_shared_modules_of_the_stage() -> None:
    spec = """
name: coat_like
input: {channels: 3, size: [64, 64]}
define:
  serial:
    params: {dim: null}
    blocks:
      - {name: cls, op: insert_cls_token, dim: "${dim}"}
      - {name: block, op: serial_block, dim: "${dim}", heads: 2, cpe: cpe, crpe: crpe}
      - {name: no_cls, op: remove_cls_token}
stages:
  - name: s1
    shared:
      cpe: {op: conv_pos_enc, dim: 16}
      crpe: {op: conv_rel_pos_enc, dim: 16, heads: 2, windows: {3: 2}}
    blocks:
      - {name: embed, op: conv_patch_embed, dim: 16, patch: 4}
      - {name: blocks, op: serial, dim: 16, depth: 2}
outputs: {x: s1.blocks}
"""
    model = bg.build_model(spec)
    graph = model.inference.graph
    assert graph.shared["s1.cpe"].users == ["s1.blocks.0.block", "s1.blocks.1.block"]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 256, 16)


TIED = """
name: tied
input: {channels: 3, size: [32, 32]}
define:
  pair:
    params: {dim: null}
    blocks:
      - {name: fc1, op: mlp, dim: "${dim}", mlp_ratio: 2}
      - {name: fc2, op: mlp, dim: "${dim}"}
  project:
    params: {dim_out: null}
    blocks: [{name: fc, op: linear, dim_out: "${dim_out}"}]
shared:
  mixer: {op: pair, dim: 16}
  cpe: {op: conv_pos_enc, dim: 16}
  proj: {op: project, dim_out: 8}
blocks:
  - {name: pe, op: conv_patch_embed, dim: 16, patch: 4}
  - {name: a, op: use, module: mixer}
  - {name: b, op: use, module: mixer}
  - {name: head, op: cls_head, dim: 16, num_classes: 3, pool: avg}
outputs: {logits: head}
"""


def test_a_defined_block_declared_shared_is_applied_with_one_set_of_weights() -> None:
    torch.manual_seed(0)
    spec = TIED.replace("  cpe: {op: conv_pos_enc, dim: 16}\n  proj: {op: project, dim_out: 8}\n", "")
    model = bg.build_model(spec).eval()
    keys = list(model.state_dict())
    assert [k for k in keys if k.startswith("mixer.")] == [
        f"mixer.{part}.{layer}.{p}" for part in ("fc1", "fc2") for layer in ("fc1", "fc2") for p in ("weight", "bias")
    ]
    assert not any(k.startswith(("a.", "b.")) for k in keys)
    assert bg.validate(spec).params == sum(p.numel() for p in model.parameters()) == 4_099
    assert "self.mixer.fc1" in module_calls(model.code)  # b's first part calls the shared module
    assert "m_mixer.fc1(a_fc2)" in model.code
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        m = model.get_submodule
        twice = m("mixer.fc2")(m("mixer.fc1")(m("mixer.fc2")(m("mixer.fc1")(m("pe")(x)))))
        torch.testing.assert_close(model(x), m("head")(twice), rtol=0, atol=0)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), model(x), rtol=0, atol=0)
    rows = {n["name"]: n for n in _summary_rows(model)}
    assert rows["a.fc1"]["params"] == 1_072 and rows["b.fc1"]["params"] == 0  # counted once, at the first use
    assert rows["a.fc1"]["macs"] == rows["b.fc1"]["macs"] == 64 * 16 * 32 * 2  # each call's own work
    model.train()
    model(x).sum().backward()  # both uses add to the one gradient
    assert all(p.grad is not None for p in model.parameters())


def _summary_rows(model: torch.nn.Module) -> list[dict]:
    from blockgraph.compiler.summary import describe

    return describe(model)["nodes"]


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (("module: mixer}\n  - {name: b", "module: mixr}\n  - {name: b"), bg.GraphError,
         "`use` names 'mixr', which is no shared block"),
        (("{name: b, op: use, module: mixer}", "{name: b, op: use, module: cpe}"), bg.GraphError,
         "`use` names 'cpe', which is a shared conv_pos_enc"),
        (("{name: b, op: use, module: mixer}",
          "{name: c, op: use, module: proj}\n  - {name: m, op: mlp, dim: 8, dim_out: 4}\n"
          "  - {name: d, op: use, module: proj}\n  - {name: back, op: mlp, dim: 8, dim_out: 16}"), bg.ShapeError,
         r"part 'proj.fc' gets tokens\[\(H//4\)\*\(W//4\), 4\] here but tokens\[\(H//4\)\*\(W//4\), 16\] in 'c.fc'"),
    ],
)  # fmt: skip
def test_uses_of_a_shared_block_are_checked(edit: tuple[str, str], error: type, message: str) -> None:
    assert edit[0] in TIED
    with pytest.raises(error, match=message):
        bg.validate(TIED.replace(*edit))


def test_shared_blocks_nest_and_a_use_inside_one_calls_its_own_shared_block() -> None:
    spec = """
name: nested_tied
input: {channels: 3, size: [32, 32]}
define:
  leaf: {params: {dim: null}, blocks: [{name: fc, op: linear, dim_out: "${dim}"}]}
  outer: {params: {dim: null}, blocks: [{name: l, op: leaf, dim: "${dim}"}, {name: u, op: use, module: inner}]}
shared:
  inner: {op: leaf, dim: 16}
  big: {op: outer, dim: 16}
blocks:
  - {name: pe, op: conv_patch_embed, dim: 16, patch: 4}
  - {name: a, op: use, module: big}
  - {name: b, op: use, module: big}
"""
    model = bg.build_model(spec)
    assert sorted(k for k in model.state_dict() if not k.startswith("pe.")) == [
        "big.l.fc.bias", "big.l.fc.weight", "inner.fc.bias", "inner.fc.weight"
    ]  # fmt: skip
    assert module_calls(model.code) == ["self.pe", "self.big.l.fc", "self.inner.fc", "self.big.l.fc", "self.inner.fc"]
    assert bg.validate(spec).params == sum(p.numel() for p in model.parameters())
