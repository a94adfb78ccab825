"""Pictures of a model's dataflow: Mermaid and Graphviz DOT text (our own code, no dependency), and SVG/PNG through
Graphviz's ``dot`` program when it is installed.

What is drawn: every node of the graph (the model input, each block; a repeated block's repetitions one by one, or
as one node with ``collapse``), labelled with its name, op and output shape at one input size; stages and paths as
nested clusters (subgraphs); each shared module once, inside the cluster that declares it, with a dashed edge to
every block that uses it; and the model's outputs and feature maps as terminal nodes. Like everything before the
compiler, this never imports torch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from blockgraph.errors import BlockgraphError
from blockgraph.graph.infer import Inference
from blockgraph.types import describe_value

FORMATS = ("mermaid", "dot", "svg", "png")
"""What :func:`render` produces; svg and png need Graphviz's ``dot`` on PATH."""


@dataclass
class Item:
    """One drawn node: a block (or group of repetitions), a shared module, the input, or an output."""

    id: str
    """Its identifier in DOT (a readable name: ``stage1.blocks.0``, ``shared:stage1.cpe``, ``output:logits``)."""
    lines: list[str]
    kind: str
    """``input``, ``block``, ``shared`` or ``output``."""


@dataclass
class Cluster:
    """A stage or a path: its nodes and nested clusters, in declaration order."""

    name: str
    label: str
    children: list[Item | Cluster] = field(default_factory=list)


@dataclass(frozen=True)
class Link:
    src: str
    dst: str
    label: str = ""
    shared: bool = False
    """A shared module → one of its users (drawn dashed)."""


@dataclass
class Picture:
    """What to draw, independent of the output format."""

    title: str
    root: Cluster
    links: list[Link]

    def items(self) -> Iterator[Item]:
        """Every drawn node, depth first in declaration order."""

        def walk(c: Cluster) -> Iterator[Item]:
            for child in c.children:
                yield from walk(child) if isinstance(child, Cluster) else (child,)

        return walk(self.root)


def picture(inference: Inference, input_size: tuple[int, int] | None = None, *, collapse: bool = False) -> Picture:
    """Lay out the graph of ``inference``: clusters per stage and path, shapes at ``input_size`` (H, W; default:
    the spec's input size). ``collapse``: draw each repeated block (``depth: N``) as one node."""
    graph = inference.graph
    spec = graph.spec
    h, w = input_size or spec.input.size
    env = {"H": h, "W": w}
    group_of = {member: group for group, members in graph.groups.items() for member in members} if collapse else {}
    if collapse:  # a block made of blocks is drawn as one, repeated or not
        for composite in reversed(graph.composites.values()):  # outer ones last: they win
            for member in composite.members:
                group_of[member] = group_of.get(composite.name, composite.name)

    def target(name: str) -> str:
        return group_of.get(name, name)

    def shape_lines(name: str) -> list[str]:
        composite = graph.composites.get(name)
        if composite is not None:  # its output's shape, or each of its ports'
            ports = [(p, graph.value_of(f"{name}.{p}")) for p in composite.spec.outputs]
            if ports:
                return [f"{p}: {line}" for p, found in ports if found for line in shape_lines(found[0])]
            name = graph.value_of(name)[0]  # type: ignore[index]
        _, shape = describe_value(inference.types[name], env)
        if isinstance(shape, dict):
            return [f"{port}: {'x'.join(map(str, s))}" for port, s in shape.items()]
        return ["x".join(map(str, shape))]

    root = Cluster("", spec.name)
    clusters: dict[str, Cluster] = {"": root}

    def cluster(scope: str) -> Cluster:
        if scope not in clusters:
            parent, _, local = scope.rpartition(".")
            composite = graph.composites.get(scope)
            if composite is not None:  # a box of its own, in the scope it is declared in
                parent, local = composite.scope, f"{_local(scope, composite.scope)} ({composite.spec.label})"
            clusters[scope] = Cluster(scope, local)
            cluster(parent).children.append(clusters[scope])
        return clusters[scope]

    drawn: set[str] = set()
    for node in sorted(graph.nodes.values(), key=lambda n: n.index):
        name = target(node.name)
        if name in drawn:
            continue
        drawn.add(name)
        if node.is_input:
            given = spec.input_specs()[name]
            shape = f"1x{h}x{w} bool" if given.kind == "mask" else f"1x{given.channels}x{h}x{w}"
            drawn_inputs = sum(getattr(c, "kind", None) == "input" for c in root.children)
            label = "mask input" if given.kind == "mask" else "input"
            root.children.insert(drawn_inputs, Item(name, [name, label, shape], "input"))
            continue
        scope = node.scopes[0] if node.scopes else ""
        folded = graph.composites.get(name) or graph.composites.get(graph.groups.get(name, [""])[-1])
        if folded is not None:  # drawn in the scope of the block made of blocks
            scope = folded.scope
        local = _local(name, scope)
        op = folded.spec.label if folded is not None else node.op
        if name in graph.groups and name != node.name:  # a group of repetitions: its last one's shape
            members = graph.groups[name]
            lines = [f"{local} ×{len(members)}", op, *shape_lines(members[-1])]
        elif folded is not None:
            lines = [local, op, *shape_lines(name)]
        else:
            lines = [local, node.op, *shape_lines(name)]
        cluster(scope).children.append(Item(name, lines, "block"))
    for qualified, shared in reversed(graph.shared.items()):  # first in their cluster, in declaration order
        scope, _, local = qualified.rpartition(".")
        cluster(scope).children.insert(0, Item(f"shared:{qualified}", [local, f"{shared.spec.op} (shared)"], "shared"))

    links: dict[Link, None] = {}  # an ordered set: each link once, in the order first drawn

    def link(item: Link) -> None:
        if item.src != item.dst:
            links[item] = None

    for name in graph.order():
        for edge in graph.in_edges(name):
            link(Link(target(edge.src), target(name), edge.out or ""))
    for qualified, shared in graph.shared.items():
        for user in shared.users:
            link(Link(f"shared:{qualified}", target(user), shared=True))
    for kind, table in (("output", graph.outputs), ("feature", graph.features)):
        for key, out in table.items():
            stride = f"stride {out.spec.stride}" if out.spec.stride else ""
            root.children.append(Item(f"{kind}:{key}", [key, kind if not stride else f"{kind}, {stride}"], "output"))
            link(Link(target(out.node), f"{kind}:{key}", out.port or ""))
    return Picture(spec.name, root, list(links))


def _local(name: str, scope: str) -> str:
    return name[len(scope) + 1 :] if scope else name


# ----------------------------------------------------------------------------------------------------------- Mermaid


def _mermaid_text(text: str) -> str:
    """Text safe inside a quoted Mermaid label (entity codes for the characters Mermaid would read)."""
    return (
        text.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;").replace("|", "#124;")
    )


def to_mermaid(p: Picture) -> str:
    """A Mermaid ``flowchart`` (GitHub renders it in Markdown): subgraphs for stages and paths, dashed edges from
    shared modules."""
    ids: dict[str, str] = {}
    used: set[str] = set()

    def ident(name: str, prefix: str) -> str:
        if name not in ids:
            base = f"{prefix}_" + re.sub(r"\W", "_", name.split(":", 1)[-1])
            candidate, i = base, 1
            while candidate in used:
                i += 1
                candidate = f"{base}_{i}"
            used.add(candidate)
            ids[name] = candidate
        return ids[name]

    prefixes = {"input": "i", "block": "n", "shared": "s", "output": "o"}
    shapes = {"input": ('[/"', '"/]'), "block": ('["', '"]'), "shared": ('{{"', '"}}'), "output": ('(["', '"])')}
    lines = ["flowchart TB"]

    def emit(c: Cluster, depth: int) -> None:
        pad = "    " * depth
        for child in c.children:
            if isinstance(child, Cluster):
                lines.append(f'{pad}subgraph {ident("cluster:" + child.name, "c")} ["{_mermaid_text(child.label)}"]')
                emit(child, depth + 1)
                lines.append(f"{pad}end")
            else:
                left, right = shapes[child.kind]
                label = "<br/>".join(_mermaid_text(t) for t in child.lines)
                lines.append(f"{pad}{ident(child.id, prefixes[child.kind])}{left}{label}{right}")

    emit(p.root, 1)
    for link in p.links:
        arrow = "-.->" if link.shared else "-->"
        label = f'|"{_mermaid_text(link.label)}"|' if link.label else ""
        lines.append(f"    {ids[link.src]} {arrow}{label} {ids[link.dst]}")
    shared_ids = [ids[item.id] for item in p.items() if item.kind == "shared"]
    if shared_ids:
        lines.append("    classDef shared stroke-dasharray: 4 3")
        lines.append(f"    class {','.join(shared_ids)} shared")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------- DOT


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(p: Picture) -> str:
    """Graphviz DOT: one ``cluster_<stage>`` subgraph per stage (paths nested inside), node ids are the graph's
    names (``shared:`` / ``output:`` / ``feature:`` prefixed for those), shared-module edges dashed."""
    attrs = {
        "input": "shape=parallelogram",
        "block": "shape=box, style=rounded",
        "shared": 'shape=box, style="rounded,dashed"',
        "output": "shape=oval",
    }
    lines = [
        f"digraph {_dot_string(p.title)} {{",
        f"    graph [rankdir=TB, label={_dot_string(p.title)}, labelloc=t, fontname=Helvetica];",
        "    node [fontname=Helvetica, fontsize=10];",
        "    edge [fontname=Helvetica, fontsize=9];",
    ]

    def emit(c: Cluster, depth: int) -> None:
        pad = "    " * depth
        for child in c.children:
            if isinstance(child, Cluster):
                lines.append(f"{pad}subgraph {_dot_string('cluster_' + child.name)} {{")
                lines.append(f"{pad}    label={_dot_string(child.label)};")
                emit(child, depth + 1)
                lines.append(f"{pad}}}")
            else:
                label = _dot_string("\n".join(child.lines))
                lines.append(f"{pad}{_dot_string(child.id)} [label={label}, {attrs[child.kind]}];")

    emit(p.root, 1)
    for link in p.links:
        extra = []
        if link.label:
            extra.append(f"label={_dot_string(link.label)}")
        if link.shared:
            extra.append("style=dashed")
        suffix = f" [{', '.join(extra)}]" if extra else ""
        lines.append(f"    {_dot_string(link.src)} -> {_dot_string(link.dst)}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def graphviz(dot_text: str, fmt: str) -> bytes:
    """Render DOT text to ``fmt`` (svg, png) with Graphviz's ``dot`` program.

    Raises:
        BlockgraphError: ``dot`` is not on PATH (with how to install it), or it failed.
    """
    exe = shutil.which("dot")
    if exe is None:
        raise BlockgraphError(
            f"--format {fmt} needs Graphviz's `dot` program, which is not on PATH",
            hint="install Graphviz (apt-get install graphviz, brew install graphviz, conda install graphviz), or use "
            "--format mermaid (GitHub renders it in Markdown) or --format dot",
        )
    try:
        done = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BlockgraphError(f"running {exe} failed: {e}", hint="check the Graphviz installation") from e
    if done.returncode != 0 or not done.stdout:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise BlockgraphError(
            f"{exe} -T{fmt} failed (exit status {done.returncode}): {message[0] if message else 'no output'}",
            hint="check the Graphviz installation (`dot -V`); --format dot prints the input it was given",
        )
    return done.stdout


def render(
    inference: Inference, fmt: str, input_size: tuple[int, int] | None = None, *, collapse: bool = False
) -> bytes:
    """The picture of a model in ``fmt`` (one of :data:`FORMATS`), as bytes (UTF-8 for the text formats)."""
    if fmt not in FORMATS:
        raise BlockgraphError(f"unknown graph format '{fmt}'", hint=f"formats: {', '.join(FORMATS)}")
    p = picture(inference, input_size, collapse=collapse)
    if fmt == "mermaid":
        return to_mermaid(p).encode()
    text = to_dot(p)
    return text.encode() if fmt == "dot" else graphviz(text, fmt)
