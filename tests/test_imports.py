"""Imports go one way: no module of the package imports, directly or through others, a module that imports it.

Every import of a ``blockgraph`` module counts, at module level and inside functions alike (a function-level import
that closes a cycle is still a cycle: the two modules still need each other). Only imports under
``if TYPE_CHECKING:`` are left out: they are read by type checkers alone and never run, so they are no dependency
at run time. An import names the module it loads (``from blockgraph.compiler import budget`` loads
``blockgraph.compiler.budget``), not the packages above it, whose ``__init__`` runs first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

from tests.conftest import ROOT

PACKAGE = "blockgraph"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


MODULES = _module_names()


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, nested ones included, except those in the body of ``if TYPE_CHECKING:``
    (its ``else:`` branch runs, so it counts)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        if isinstance(node, ast.If) and _type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(module: str, statement: ast.Import | ast.ImportFrom) -> list[str]:
    """The package's modules an import statement in ``module`` loads: ``import a.b`` and ``from a import b`` name
    the module ``a.b`` when it is one, ``from a.b import name`` (a name defined in ``a.b``) the module ``a.b``."""
    if isinstance(statement, ast.Import):
        return [alias.name for alias in statement.names if alias.name in MODULES]
    base = statement.module or ""
    if statement.level:  # relative: from the package holding `module` (itself, for an __init__)
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        anchor = package.rsplit(".", statement.level - 1)[0] if statement.level > 1 else package
        base = f"{anchor}.{base}" if base else anchor
    targets = []
    for alias in statement.names:
        if f"{base}.{alias.name}" in MODULES:
            targets.append(f"{base}.{alias.name}")
        elif base in MODULES:
            targets.append(base)
    return targets


def import_graph() -> nx.DiGraph:
    """The package's modules, with an edge from each module to every package module it imports."""
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for module, path in MODULES.items():
        for statement in _imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(module, statement):
                if target != module:
                    graph.add_edge(module, target, line=statement.lineno)
    return graph


def _describe(graph: nx.DiGraph, cycle: list[str]) -> str:
    """``a (line 3) -> b (line 12) -> a``: each module, the line of its import of the next."""
    start = cycle.index(min(cycle))
    cycle = cycle[start:] + cycle[:start]
    steps = [f"{m} (line {graph.edges[m, n]['line']})" for m, n in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
    return " -> ".join([*steps, cycle[0]])


def test_the_graph_sees_function_level_and_package_imports() -> None:
    """The parser itself: a function-level import is an edge, ``from package import module`` is an edge to the
    module, a ``TYPE_CHECKING`` import is none."""
    graph = import_graph()
    assert graph.has_edge("blockgraph.cli", "blockgraph.api")  # imported inside cmd_* functions only
    assert graph.has_edge("blockgraph.api", "blockgraph.compiler.budget")  # from blockgraph.compiler import budget
    assert not graph.has_edge("blockgraph.spec.schema", "blockgraph.graph.infer")  # under `if TYPE_CHECKING:`


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(sorted(_describe(graph, c) for c in cycles))
