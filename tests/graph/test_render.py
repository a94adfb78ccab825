"""Pictures of the dataflow: DOT checked by parsing it with an independent parser (pydot), Mermaid by its structure;
svg/png through Graphviz's `dot` (a stand-in program here: Graphviz is not installed on CI)."""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import pydot
import pytest

import blockgraph as bg
from tests.conftest import ROOT
from tests.support.processes import run_without_torch

SMALL = ROOT / "specs" / "coat_lite_small.yaml"
pytestmark = pytest.mark.filterwarnings("ignore:'\\w+' deprecated - use")  # pydot on pyparsing 3.3


def _unquote(name: str) -> str:
    return name[1:-1] if name.startswith('"') and name.endswith('"') else name


def _parse_dot(text: str) -> pydot.Dot:
    graphs = pydot.graph_from_dot_data(text)
    assert graphs and len(graphs) == 1
    return graphs[0]


def _clusters(g: pydot.Graph) -> dict[str, tuple[set[str], pydot.Subgraph]]:
    """Every cluster (nested ones too): name → (its own node ids, the subgraph)."""
    out = {}
    for sub in g.get_subgraphs():
        out[_unquote(sub.get_name())] = ({_unquote(n.get_name()) for n in sub.get_nodes()}, sub)
        out.update(_clusters(sub))
    return out


def _all_nodes(g: pydot.Graph) -> set[str]:
    nodes = {_unquote(n.get_name()) for n in g.get_nodes()} - {"node", "edge", "graph"}
    for sub in g.get_subgraphs():
        nodes |= _all_nodes(sub)
    return nodes


def _edges(g: pydot.Graph) -> list[tuple[str, str, dict]]:
    return [(_unquote(e.get_source()), _unquote(e.get_destination()), e.get_attributes()) for e in g.get_edges()]


def test_dot_has_every_node_edge_cluster_and_shared_user(run_cli) -> None:
    code, out, err = run_cli("graph", SMALL, "--format", "dot")
    assert code == 0, err
    g = _parse_dot(out)
    analysis = bg.analyze(SMALL)
    graph = analysis.graph
    nodes = _all_nodes(g)
    expected = set(graph.nodes) | {f"shared:{q}" for q in graph.shared}
    expected |= {f"output:{k}" for k in graph.outputs} | {f"feature:{k}" for k in graph.features}
    assert nodes == expected
    edges = _edges(g)
    plain = {(s, d, a.get("label")) for s, d, a in edges if a.get("style") != "dashed"}
    dataflow = {(e.src, e.dst, f'"{e.out}"' if e.out else None) for n in graph.nodes for e in graph.in_edges(n)}
    outputs = {(o.node, f"output:{k}", None) for k, o in graph.outputs.items()}
    outputs |= {(o.node, f"feature:{k}", None) for k, o in graph.features.items()}
    assert plain == dataflow | outputs
    # Shared modules: drawn once each, with one dashed edge to every block that uses them.
    dashed = sorted((s, d) for s, d, a in edges if a.get("style") == "dashed")
    users = sorted((f"shared:{q}", u) for q, m in graph.shared.items() for u in m.users)
    assert dashed == users and len(users) == 2 * 16  # cpe and crpe, each to the 3 + 4 + 6 + 3 serial blocks
    # One cluster per stage holding exactly that stage's blocks and shared modules.
    clusters = _clusters(g)
    assert set(clusters) == {f"cluster_stage{i}" for i in range(1, 5)}
    for i in range(1, 5):
        members, sub = clusters[f"cluster_stage{i}"]
        stage = {n for n, node in graph.nodes.items() if node.stage == f"stage{i}"}
        assert members == stage | {f"shared:stage{i}.cpe", f"shared:stage{i}.crpe"}
        assert _unquote(sub.get("label")) == f"stage{i}"
    label = next(n for n in g.get_subgraphs()[0].get_nodes() if _unquote(n.get_name()) == "stage1.blocks.2")
    assert _unquote(label.get("label")) == r"blocks.2\nserial_block\n1x3137x64"


def test_paths_are_clusters_inside_their_stage() -> None:
    from blockgraph.graph.render import picture, to_dot

    analysis = bg.analyze(ROOT / "specs" / "mpvit_tiny.yaml")
    g = _parse_dot(to_dot(picture(analysis.inference)))
    stage2 = next(s for s in g.get_subgraphs() if _unquote(s.get_name()) == "cluster_stage2")
    inner = {_unquote(s.get_name()): s for s in stage2.get_subgraphs()}
    assert set(inner) == {
        "cluster_stage2.local",
        "cluster_stage2.path0",
        "cluster_stage2.path1",
        "cluster_stage2.path2",
    }
    path1 = {_unquote(n.get_name()) for n in inner["cluster_stage2.path1"].get_nodes()}
    assert path1 == {
        "shared:stage2.path1.cpe",
        "shared:stage2.path1.crpe",
        "stage2.path1.tokens",
        "stage2.path1.layers.0",
        "stage2.path1.layers.1",
        "stage2.path1.map",
    }
    edges = {(s, d, a.get("label")) for s, d, a in _edges(g)}
    assert ("stage2.patch_embed", "stage2.path1.tokens", '"p1"') in edges  # a multi-output block's port
    assert ("stage2.path1.map", "stage2.aggregate", None) in edges


def test_collapse_draws_a_repeated_block_once() -> None:
    from blockgraph.graph.render import picture, to_dot

    analysis = bg.analyze(SMALL)
    g = _parse_dot(to_dot(picture(analysis.inference, collapse=True)))
    nodes = _all_nodes(g)
    assert "stage3.blocks" in nodes and not any(n.startswith("stage3.blocks.") for n in nodes)
    edges = {(s, d) for s, d, _ in _edges(g)}
    assert {
        ("stage3.cls", "stage3.blocks"),
        ("stage3.blocks", "stage3.to_map"),
        ("shared:stage3.cpe", "stage3.blocks"),
    } <= edges
    assert ("stage3.blocks", "stage3.blocks") not in edges
    blocks = next(n for n in g.get_subgraphs()[2].get_nodes() if _unquote(n.get_name()) == "stage3.blocks")
    assert _unquote(blocks.get("label")) == r"blocks ×6\nserial_block\n1x197x320"


def _mermaid_structure(text: str) -> tuple[dict[str, str], list[tuple[str, str, str]], list[str]]:
    """Node ids → labels, edges (src, arrow, dst) and subgraph titles, checking that subgraphs nest properly."""
    lines = text.splitlines()
    assert lines[0] == "flowchart TB"
    nodes: dict[str, str] = {}
    edges, subgraphs, depth = [], [], 0
    for line in lines[1:]:
        body = line.strip()
        if m := re.fullmatch(r'subgraph (\w+) \["([^"]*)"\]', body):
            subgraphs.append(m.group(2))
            depth += 1
        elif body == "end":
            depth -= 1
            assert depth >= 0
        elif m := re.fullmatch(r'(\w+) (-->|-\.->)(?:\|"[^"]*"\|)? (\w+)', body):
            edges.append((m.group(1), m.group(2), m.group(3)))
        elif m := re.fullmatch(r'(\w+)(\[/"|\["|\{\{"|\(\[")([^"]*)("/\]|"\]|"\}\}|"\]\))', body):
            assert m.group(1) not in nodes, f"node {m.group(1)} defined twice"
            nodes[m.group(1)] = m.group(3)
        elif not body.startswith(("classDef ", "class ")):
            raise AssertionError(f"unexpected line: {line!r}")
    assert depth == 0
    return nodes, edges, subgraphs


def test_mermaid_structure(run_cli) -> None:
    code, out, err = run_cli("graph", SMALL)  # mermaid is the default
    assert code == 0, err
    nodes, edges, subgraphs = _mermaid_structure(out)
    graph = bg.analyze(SMALL).graph
    assert len(nodes) == len(graph.nodes) + len(graph.shared) + len(graph.outputs) + len(graph.features)
    assert all(s in nodes and d in nodes for s, _, d in edges)
    assert subgraphs == ["stage1", "stage2", "stage3", "stage4"]
    assert sum(arrow == "-.->" for _, arrow, _ in edges) == 32
    assert nodes["s_stage2_crpe"] == "crpe<br/>conv_rel_pos_enc (shared)"
    assert nodes["n_stage4_blocks_2"] == "blocks.2<br/>serial_block<br/>1x50x512"


def test_mermaid_escapes_labels() -> None:
    from blockgraph.graph.render import Cluster, Item, Link, Picture, to_mermaid

    p = Picture("x", Cluster("", "x", [Item("a", ['say "hi" <b> #1 | 2'], "block")]), [Link("a", "a", "")])
    text = to_mermaid(p)
    assert 'n_a["say #quot;hi#quot; #lt;b#gt; #35;1 #124; 2"]' in text


def test_svg_and_png_without_graphviz_is_a_clear_error(tmp_path: Path, monkeypatch, run_cli) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` here
    for fmt in ("svg", "png"):
        code, out, err = run_cli("graph", SMALL, "--format", fmt, "--out", tmp_path / f"g.{fmt}")
        assert code == 2 and out == ""
        assert f"error: --format {fmt} needs Graphviz's `dot` program, which is not on PATH" in err
        assert "hint: install Graphviz" in err and "--format mermaid" in err
    assert os.listdir(tmp_path) == []


def _fake_dot(directory: Path, script: str) -> None:
    exe = directory / "dot"
    exe.write_text(f"#!{sys.executable}\n{script}")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_svg_goes_through_dot(tmp_path: Path, monkeypatch, run_cli) -> None:
    _fake_dot(
        tmp_path,
        "import sys, pathlib\n"
        "pathlib.Path(sys.argv[0]).with_name('got.dot').write_bytes(sys.stdin.buffer.read())\n"
        "sys.stdout.write('<svg>' + sys.argv[1] + '</svg>')\n",
    )
    monkeypatch.setenv("PATH", str(tmp_path))
    out_file = tmp_path / "out" / "g.svg"
    out_file.parent.mkdir()
    code, out, err = run_cli("graph", SMALL, "--format", "svg", "--out", out_file)
    assert code == 0, err
    assert out_file.read_text() == "<svg>-Tsvg</svg>"
    assert os.listdir(out_file.parent) == ["g.svg"]  # written atomically: no temporary left
    _, dot_text, _ = run_cli("graph", SMALL, "--format", "dot")
    assert (tmp_path / "got.dot").read_text() == dot_text  # dot was given exactly our DOT text
    code, out, _ = run_cli("graph", SMALL, "--format", "svg")
    assert code == 0 and out == "<svg>-Tsvg</svg>"


def test_a_failing_dot_is_reported(tmp_path: Path, monkeypatch, run_cli) -> None:
    _fake_dot(tmp_path, "import sys\nsys.stderr.write('Error: syntax error in line 3\\n')\nsys.exit(1)\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = run_cli("graph", SMALL, "--format", "png", "--out", tmp_path / "g.png")
    assert code == 2
    assert "-Tpng failed (exit status 1): Error: syntax error in line 3" in err
    assert not (tmp_path / "g.png").exists()


def test_graph_does_not_import_torch() -> None:
    result = run_without_torch("graph", SMALL, "--format", "dot")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('digraph "coat_lite_small" {')
