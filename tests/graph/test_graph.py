"""Tests of blockgraph.graph.build: wiring (default chaining, `from:`), ports, order, shared modules, and lint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Literal

import pytest

import blockgraph as bg
from blockgraph.errors import BlockgraphError, GraphError
from blockgraph.graph.build import Edge, Graph, build_graph
from blockgraph.spec import schema
from blockgraph.spec.expand import expand
from blockgraph.spec.schema import BlockSpec, parse, register
from blockgraph.types import TensorType
from tests.support.positions import at, where


def graph(text: str) -> Graph:
    """The graph of a spec, without shape inference (so the specs below need not be shape-correct)."""
    return build_graph(parse(expand(None, text=text, file="g.yaml")))  # type: ignore[arg-type]


def problems(text: str) -> list[BlockgraphError]:
    with pytest.raises(BlockgraphError) as info:
        graph(text)
    return info.value.errors


def sources(g: Graph, name: str) -> list[str]:
    return [e.src for e in g.in_edges(name)]


def stage(*blocks: str, outputs: str = "") -> str:
    """A one-stage spec ``s`` with the given block lines (flow mappings)."""
    lines = "".join(f"      - {b}\n" for b in blocks)
    return f"name: t\nstages:\n  - name: s\n    blocks:\n{lines}" + (f"outputs: {outputs}\n" if outputs else "")


TINY = """\
name: tiny
input: {channels: 3, size: [64, 64]}
stages:
  - name: s1
    shared:
      cpe: {op: conv_pos_enc, dim: 32}
      crpe: {op: conv_rel_pos_enc, dim: 32, heads: 4, windows: {3: 2, 5: 2}}
    blocks:
      - {name: embed, op: conv_patch_embed, dim: 32, patch: 4}
      - {name: cls, op: insert_cls_token, dim: 32}
      - {name: block, op: serial_block, dim: 32, heads: 4, cpe: cpe, crpe: crpe, depth: 2}
      - {name: no_cls, op: remove_cls_token}
      - {name: to_map, op: tokens_to_map}
  - name: s2
    blocks:
      - {name: embed, op: conv_patch_embed, dim: 48, patch: 2}
      - {name: mlp, op: mlp, dim: 48}
blocks:
  - {name: norm_in, op: mlp, dim: 48}
  - {name: head, op: cls_head, dim: 48, num_classes: 10, pool: avg}
outputs: {logits: head}
features: {early: {from: s1.block, stride: 4}}
"""


# ------------------------------------------------------------------------------------------------------------- wiring


def test_default_chaining_across_stages_and_into_top_level_blocks() -> None:
    g = bg.analyze(TINY).graph
    assert {name: sources(g, name) for name in g.order()} == {
        "image": [],
        "s1.embed": ["image"],  # the first block reads the model input
        "s1.cls": ["s1.embed"],
        "s1.block.0": ["s1.cls"],
        "s1.block.1": ["s1.block.0"],
        "s1.no_cls": ["s1.block.1"],
        "s1.to_map": ["s1.no_cls"],
        "s2.embed": ["s1.to_map"],  # a stage's first block reads the previous stage's last
        "s2.mlp": ["s2.embed"],
        "norm_in": ["s2.mlp"],  # the first top-level block reads the last stage's last
        "head": ["norm_in"],
    }
    assert g.groups == {"s1.block": ["s1.block.0", "s1.block.1"]}
    assert g.features["early"].node == "s1.block.1"
    assert g.warnings == []
    assert len(g) == 11


def test_from_local_full_group_and_input_names() -> None:
    g = graph(
        "name: t\nstages:\n"
        "  - name: s1\n    blocks:\n"
        "      - {name: a, op: map_to_tokens}\n"
        "      - {name: rep, op: remove_cls_token, depth: 3}\n"
        "      - {name: b, op: tokens_to_map, from: a}\n"  # local name
        "  - name: s2\n    blocks:\n"
        "      - {name: a, op: map_to_tokens, from: s1.a}\n"  # full name
        "      - {name: b, op: tokens_to_map, from: a}\n"  # local first: s2.a, not s1.a
        "      - {name: c, op: tokens_to_map, from: s1.rep}\n"  # a group: its last repetition
        "      - {name: d, op: map_to_tokens, from: image}\n"  # the model input
        "blocks:\n"
        "  - {name: head, op: tokens_to_map, from: s2.b}\n"
    )
    assert {n: sources(g, n) for n in ["s1.b", "s2.a", "s2.b", "s2.c", "s2.d", "head"]} == {
        "s1.b": ["s1.a"],
        "s2.a": ["s1.a"],
        "s2.b": ["s2.a"],
        "s2.c": ["s1.rep.2"],
        "s2.d": ["image"],
        "head": ["s2.b"],
    }
    assert sources(g, "s1.rep.0") == ["s1.a"]  # a repeated block chains through its repetitions
    assert sources(g, "s1.rep.2") == ["s1.rep.1"]


def test_a_list_from_into_a_one_input_op() -> None:
    text = stage(
        "{name: a, op: map_to_tokens}", "{name: b, op: map_to_tokens}", "{name: c, op: map_to_tokens, from: [a, b]}"
    )
    (error,) = problems(text)
    assert isinstance(error, GraphError)
    assert "op 'map_to_tokens' takes 1 input" in error.message and "gives 2" in error.message
    assert error.node == "s.c"
    assert where(error.pos) == at(text, "[a, b]")


def test_a_list_from_with_one_item_is_fine() -> None:
    g = graph(stage("{name: a, op: map_to_tokens}", "{name: b, op: map_to_tokens, from: [a]}"))
    assert g.in_edges("s.b") == [Edge("s.a", "s.b", 0, None)]


class PairSpec(BlockSpec):
    """A test-only op that takes two inputs."""

    op: Literal["test_pair"]
    arity: ClassVar[int | None] = 2

    def infer(self, ctx, a: TensorType, b: TensorType) -> TensorType:  # type: ignore[override]
        return a


@pytest.fixture
def pair_op() -> Iterator[None]:
    register(PairSpec)
    yield
    schema._REGISTRY.pop("test_pair", None)  # leave the registry as the other tests expect it
    schema._CACHE.clear()


def test_edges_carry_the_input_port(pair_op: None) -> None:
    text = stage(
        "{name: a, op: map_to_tokens}",
        "{name: b, op: map_to_tokens, from: image}",
        "{name: p, op: test_pair, from: [b, a]}",
        "{name: q, op: test_pair, from: [a, a]}",
    )
    g = graph(text)
    assert g.in_edges("s.p") == [Edge("s.b", "s.p", 0, None), Edge("s.a", "s.p", 1, None)]
    assert g.in_edges("s.q") == [Edge("s.a", "s.q", 0, None), Edge("s.a", "s.q", 1, None)]  # one edge per port
    assert sorted((e.dst, e.port) for e in g.out_edges("s.a")) == [("s.p", 1), ("s.q", 0), ("s.q", 1)]


def test_a_two_input_op_given_one(pair_op: None) -> None:
    text = stage("{name: a, op: map_to_tokens}", "{name: p, op: test_pair, from: a}")
    (error,) = problems(text)
    assert "op 'test_pair' takes 2 inputs" in error.message
    assert where(error.pos) == at(text, "a}")


def test_order_is_topological_with_ties_in_declaration_order() -> None:
    text = stage(
        "{name: z, op: map_to_tokens}",
        "{name: later, op: tokens_to_map, from: q}",  # reads a block declared after it
        "{name: q, op: map_to_tokens, from: image}",
        "{name: y, op: map_to_tokens, from: image}",
        "{name: x, op: tokens_to_map, from: z}",
    )
    g = graph(text)
    assert g.order() == ["image", "s.z", "s.q", "s.later", "s.y", "s.x"]
    assert [n.name for n in g] == g.order()
    assert graph(text).order() == g.order()  # deterministic


def test_to_networkx_returns_a_copy() -> None:
    g = graph(stage("{name: a, op: map_to_tokens}", "{name: b, op: tokens_to_map}"))
    copy = g.to_networkx()
    assert sorted(copy.edges()) == [("image", "s.a"), ("s.a", "s.b")]
    assert copy.nodes["s.a"]["node"] is g.node("s.a")
    copy.add_edge("s.b", "s.a", port=0, out=None)
    copy.remove_node("image")
    assert g.order() == ["image", "s.a", "s.b"]
    assert g.in_edges("s.a") == [Edge("image", "s.a", 0, None)]
    assert g.to_networkx() is not g.to_networkx()


# --------------------------------------------------------------------------------------------------------------- lint


def test_duplicate_names_report_both_positions() -> None:
    text = stage("{name: a, op: map_to_tokens}", "{name: b, op: remove_cls_token}", "{name: a, op: tokens_to_map}")
    (error,) = problems(text)
    first = at(text, "{name: a, op: map")
    assert error.message == f"duplicate node name 's.a' (first defined at g.yaml:{first[0]}:{first[1]})"
    assert where(error.pos) == at(text, "a, op: tokens", 0)
    assert error.node == "s.a"


def test_a_block_named_like_a_repeated_group_is_a_duplicate() -> None:
    text = stage("{name: b, op: remove_cls_token, depth: 2}", "{name: b, op: map_to_tokens}")
    (error,) = problems(text)
    assert "duplicate node name 's.b'" in error.message
    assert where(error.pos) == at(text, "b, op: map")


def test_a_block_named_like_a_later_repeated_group_is_a_duplicate() -> None:
    text = stage(
        "{name: b, op: map_to_tokens}",
        "{name: b, op: remove_cls_token, depth: 2}",
        "{name: c, op: tokens_to_map, from: b}",
        outputs="{o: s.c}",
    )
    errors = problems(text)
    assert any("duplicate node name 's.b'" in e.message for e in errors)


@pytest.mark.parametrize(
    ("ref", "hint"),
    [
        ("alpah", "did you mean 'alpha' or 's.alpha'?"),
        ("s.alpah", "did you mean 's.alpha' or 'alpha'?"),
        ("zzz", "a reference names a block declared earlier"),
    ],
)
def test_unknown_reference(ref: str, hint: str) -> None:
    text = stage("{name: alpha, op: map_to_tokens}", f"{{name: beta, op: tokens_to_map, from: {ref}}}")
    (error,) = problems(text)
    assert error.message == f"unknown reference '{ref}'"
    assert error.hint.startswith(hint)
    assert error.node == "s.beta"
    assert where(error.pos) == at(text, f"{ref}}}")


def test_unknown_output_reference() -> None:
    text = stage("{name: gamma, op: map_to_tokens}", outputs="{o: s.gama}")
    (error,) = problems(text)
    assert error.message == "unknown reference 's.gama'"
    assert "did you mean 's.gamma'" in error.hint
    assert where(error.pos) == at(text, "s.gama")


def test_cycles_are_listed_node_by_node() -> None:
    text = stage(
        "{name: a, op: map_to_tokens, from: b}",
        "{name: b, op: map_to_tokens}",  # reads a: a 2-cycle
        "{name: c, op: map_to_tokens, from: c}",  # a self-loop
        outputs="{o: s.c}",
    )
    errors = problems(text)
    assert [e.message for e in errors] == [
        "the dataflow has a cycle: s.a -> s.b -> s.a",
        "the dataflow has a cycle: s.c -> s.c",
    ]
    assert [e.node for e in errors] == ["s.a", "s.c"]  # the block whose `from:` closes it
    assert [where(e.pos) for e in errors] == [at(text, "from: b}", 6), at(text, "from: c}", 6)]
    assert all("runs before it" in e.hint for e in errors)


def test_unused_blocks_are_warnings_not_errors() -> None:
    text = stage(
        "{name: a, op: map_to_tokens}",
        "{name: b, op: tokens_to_map}",
        "{name: c, op: tokens_to_map, from: a}",
        "{name: d, op: tokens_to_map, from: image}",
        outputs="{o: s.b}",
    )
    g = graph(text)
    assert [(w.kind, w.node, where(w.pos)) for w in g.warnings] == [
        ("warning", "s.c", at(text, "{name: c")),
        ("warning", "s.d", at(text, "{name: d")),
    ]
    assert all(isinstance(w, GraphError) and "reaches no model output" in w.message for w in g.warnings)
    assert [(w.kind, w.node) for w in g.lint()] == [(w.kind, w.node) for w in g.warnings]  # lint() runs again


def test_no_outputs_means_no_unused_warnings() -> None:
    assert graph(stage("{name: a, op: map_to_tokens}", "{name: b, op: tokens_to_map, from: image}")).warnings == []


# ----------------------------------------------------------------------------------------------------- shared modules

SHARED = """\
name: t
shared:
  cpe: {op: conv_pos_enc, dim: 8}
  lonely: {op: conv_pos_enc, dim: 8}
stages:
  - name: s
    shared:
      cpe: {op: conv_pos_enc, dim: 16}
      crpe: {op: conv_rel_pos_enc, dim: 16, heads: 2, windows: {3: 2}}
    blocks:
      - {name: a, op: serial_block, dim: 16, heads: 2, cpe: cpe, crpe: crpe}
  - name: t
    blocks:
      - {name: a, op: serial_block, dim: 8, heads: 2, cpe: cpe, crpe: s.crpe}
outputs: {o: t.a}
"""


def test_shared_modules_are_looked_up_in_the_stage_then_globally() -> None:
    g = graph(SHARED)
    assert g.node("s.a").shared == {"cpe": "s.cpe", "crpe": "s.crpe"}  # the stage's own cpe hides the global one
    assert g.node("t.a").shared == {"cpe": "cpe", "crpe": "s.crpe"}  # global, and another stage's by full name
    assert {k: m.users for k, m in g.shared.items()} == {
        "cpe": ["t.a"],
        "lonely": [],
        "s.cpe": ["s.a"],
        "s.crpe": ["s.a", "t.a"],
    }


def test_a_shared_module_nobody_uses_is_a_warning() -> None:
    (warning,) = graph(SHARED).warnings
    assert (warning.kind, warning.node, warning.message) == ("warning", "lonely", "shared module is used by no block")
    assert where(warning.pos) == at(SHARED, "{op: conv_pos_enc, dim: 8}\nstages")


def test_a_shared_module_of_the_wrong_op() -> None:
    text = SHARED.replace("cpe: cpe, crpe: s.crpe", "cpe: s.crpe, crpe: s.crpe")
    (error,) = problems(text)
    assert error.message == "'cpe' needs a shared module of op conv_pos_enc, 's.crpe' is conv_rel_pos_enc"
    assert error.node == "t.a"
    assert where(error.pos) == at(text, "s.crpe, crpe")
    assert error.hint == "conv_pos_enc here: cpe, lonely, s.cpe"  # names that resolve from stage t


def test_unknown_shared_module() -> None:
    text = SHARED.replace("crpe: crpe}", "crpe: crpee}")
    (error,) = problems(text)
    assert error.message == "unknown shared module 'crpee'"
    assert error.hint == "did you mean 'crpe'?"
    assert where(error.pos) == at(text, "crpee")


def test_a_stage_shared_module_is_not_visible_by_its_short_name_elsewhere() -> None:
    text = SHARED.replace("crpe: s.crpe}", "crpe: crpe}")
    (error,) = problems(text)
    assert error.message == "unknown shared module 'crpe'"
    assert error.node == "t.a"
