"""The dataflow graph of a parsed spec, kept behind a small API of our own (networkx underneath).

Nodes are block instances named ``stage.block`` (``stage2.blocks.3``), plus one node per model input. Edges point
the way data flows, producer → consumer, and carry the consumer's input ``port`` (0, 1, ...) and the producer's
output port name (``None`` for single-output blocks). Shared modules are not dataflow nodes: each lives in
:attr:`Graph.shared` with the nodes that use it. Analysis results are stored on nodes under documented keys of
:attr:`Node.meta` (``"type"``: the static :class:`~blockgraph.types.TensorType`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from blockgraph.errors import BlockgraphError, GraphError, Pos, raise_all
from blockgraph.graph.names import module_name_errors
from blockgraph.spec.expand import Path
from blockgraph.spec.schema import BlockSpec, CompositeBase, ModelBase, OutputSpec, ParsedSpec, UseSpec


@dataclass
class Node:
    """A block instance (or a model input, when ``spec`` is None)."""

    name: str
    spec: BlockSpec | None
    path: Path
    """Where the block is in the expanded spec (``("stages", 1, "blocks", 3)``), for error positions."""
    index: int
    """Declaration order: ties in the topological order are broken by it, so the order follows the spec."""
    stage: str | None = None
    scopes: tuple[str, ...] = ()
    """Where local names are looked up, innermost first (``("stage1.path0", "stage1")``), then globally."""
    shared: dict[str, str | list[str]] = field(default_factory=dict)
    """Field name → qualified name(s) of the shared module(s) it uses (``{"cpe": "stage1.cpe"}``)."""
    meta: dict[str, Any] = field(default_factory=dict)
    module: str | None = None
    """Where its module lives when it is another's: a part of a ``use`` of a shared block calls the module of that
    part of the shared declaration (``mixer.mlp``); None: its own, under its name."""

    @property
    def module_name(self) -> str:
        """The dotted name of the module this node calls."""
        return self.module or self.name

    @property
    def op(self) -> str:
        return self.spec.op if self.spec is not None else "input"

    @property
    def is_input(self) -> bool:
        return self.spec is None


@dataclass
class SharedModule:
    """A module declared once under ``shared:`` and used by several blocks."""

    name: str
    spec: BlockSpec
    path: Path
    users: list[str] = field(default_factory=list)


@dataclass
class Composite:
    """A block made of blocks (a use of a ``define:``d block): not a node itself; its blocks are nodes named
    ``<name>.<local>``, and references to it read its output node (or, with ports, one of its outputs)."""

    name: str
    spec: CompositeBase
    path: Path
    scope: str = ""
    """The stage, path or composite it is declared in ("": the model)."""
    members: list[str] = field(default_factory=list)
    """The nodes it is made of, its inner composites' included, in declaration order."""


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    port: int
    out: str | None = None


@dataclass(frozen=True)
class Output:
    name: str
    node: str
    port: str | None
    spec: OutputSpec
    path: Path


class Graph:
    """The dataflow graph of one model spec."""

    def __init__(self, parsed: ParsedSpec):
        self.parsed = parsed
        self.spec: ModelBase = parsed.model
        self.source = parsed.source
        self._g = nx.MultiDiGraph()
        self._order: list[str] | None = None
        self.nodes: dict[str, Node] = {}
        self.shared: dict[str, SharedModule] = {}
        self.outputs: dict[str, Output] = {}
        self.features: dict[str, Output] = {}
        self.groups: dict[str, list[str]] = {}
        """A repeated block's name (``stage1.blocks``) → its nodes (``stage1.blocks.0`` ...)."""
        self.composites: dict[str, Composite] = {}
        """Blocks made of blocks, by name (:class:`Composite`)."""
        self.shared_blocks: dict[str, SharedModule] = {}
        """Blocks made of blocks declared under ``shared:``, applied by ``use`` nodes (their ``users``)."""
        self.aliases: dict[str, tuple[str, str | None]] = {}
        """Names that stand for a node's output: a composite's name → its output node (``stage1.mlp`` →
        ``(stage1.mlp.fc2, None)``), its ports and its inputs (``stage1.mlp.x`` → what the composite reads)."""
        self.warnings: list[BlockgraphError] = []
        self._errors: list[BlockgraphError] = []

    # ----------------------------------------------------------------------------------------------- queries

    def pos(self, path: Path) -> Pos:
        return self.source.value(path)

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def in_edges(self, name: str) -> list[Edge]:
        """The edges into ``name``, by port."""
        edges = [Edge(u, v, d["port"], d["out"]) for u, v, d in self._g.in_edges(name, data=True)]
        return sorted(edges, key=lambda e: e.port)

    def out_edges(self, name: str) -> list[Edge]:
        return [Edge(u, v, d["port"], d["out"]) for u, v, d in self._g.out_edges(name, data=True)]

    def order(self) -> list[str]:
        """Nodes in topological order, ties broken by declaration order (deterministic; computed once)."""
        if self._order is None:
            index = {name: node.index for name, node in self.nodes.items()}
            self._order = list(nx.lexicographical_topological_sort(self._g, key=index.__getitem__))
        return list(self._order)

    def ancestors(self, names: list[str]) -> set[str]:
        out = set(names)
        for name in names:
            out |= nx.ancestors(self._g, name)
        return out

    def __iter__(self) -> Iterator[Node]:
        return (self.nodes[n] for n in self.order())

    def __len__(self) -> int:
        return len(self.nodes)

    def to_networkx(self) -> nx.MultiDiGraph:
        """A copy of the underlying networkx graph (node attribute ``node``: our :class:`Node`)."""
        return self._g.copy()

    # ------------------------------------------------------------------------------------------------- lint

    def lint(self) -> list[BlockgraphError]:
        """Check the graph's invariants; return every problem found (errors first, then warnings).

        Errors: duplicate names, unknown references and shared modules (collected while building), cycles
        (each listed node by node), outputs that name no node. Warnings: nodes that reach no output.
        """
        problems = [p for p in self._errors if p.kind != "warning"]
        for cycle in _cycles(self._g):
            explicit = [n for n in cycle if self.nodes[n].spec is not None and self.nodes[n].spec.from_ is not None]
            first = self.nodes[explicit[0] if explicit else cycle[0]]
            shown = " -> ".join([*cycle, cycle[0]])
            problems.append(
                GraphError(
                    f"the dataflow has a cycle: {shown}",
                    pos=self.pos(first.path + ("from",)),
                    node=first.name,
                    hint="a block's `from:` must name a block that runs before it",
                )
            )
        if not problems:
            problems.extend(p for p in self._errors if p.kind == "warning")
            problems.extend(self._unused())
        return problems

    def _unused(self) -> list[BlockgraphError]:
        targets = [o.node for o in (*self.outputs.values(), *self.features.values())]
        if not targets:
            return []
        used = self.ancestors(targets)
        return [
            GraphError(
                "this block's output reaches no model output",
                pos=self.pos(node.path),
                node=name,
                hint="use it as a `from:` of another block or name it under `outputs:`/`features:`",
                warning=True,
            )
            for name, node in self.nodes.items()
            if name not in used and not node.is_input
        ]

    # ----------------------------------------------------------------------------------------------- building

    def _add(self, node: Node) -> None:
        if node.name in self.nodes or node.name in self.groups or node.name in self.composites:
            other = self.nodes.get(node.name)
            where = f" (first defined at {self.pos(other.path)})" if other else ""
            self._errors.append(
                GraphError(
                    f"duplicate node name '{node.name}'{where}",
                    pos=self.source.value(node.path + ("name",)),
                    node=node.name,
                    hint="every block of a stage needs its own `name:`",
                )
            )
            return
        self.nodes[node.name] = node
        self._g.add_node(node.name, node=node)
        self._order = None

    def _shared_block(self, use: BlockSpec, path: Path, scopes: tuple[str, ...]) -> SharedModule | None:
        """The shared block a ``use`` applies (innermost scope first), or None after reporting why not."""
        ref: str = use.module  # type: ignore[attr-defined]
        found = next((q for q in [f"{s}.{ref}" for s in scopes] + [ref] if q in self.shared_blocks), None)
        if found is not None:
            return self.shared_blocks[found]
        other = next((q for q in [f"{s}.{ref}" for s in scopes] + [ref] if q in self.shared), None)
        visible = [q for q in self.shared_blocks if not q.count(".") or any(q.startswith(f"{s}.") for s in scopes)]
        self._errors.append(
            GraphError(
                f"`use` names '{ref}', which is {'a shared ' + self.shared[other].spec.op if other else 'no shared block'}"
                + (": `use` applies shared blocks made of blocks (defined in the spec)" if other else ""),
                pos=self.pos(path + ("module",)),
                node=_entry_name(use, scopes),
                hint=f"shared blocks here: {', '.join(visible)}"
                if visible
                else "declare one under `shared:`, e.g. `shared: {mixer: {op: my_block, ...}}`",
            )
        )
        return None

    def _add_composite(self, composite: Composite) -> None:
        name = composite.name
        if name in self.nodes or name in self.groups or name in self.composites:
            self._add(Node(name, composite.spec, composite.path, -1))  # reports the duplicate
            return
        self.composites[name] = composite

    def _composite_outputs(self, composite: Composite) -> None:
        """Alias a composite's name (or each of its ports) to the node that gives its value."""
        spec, name = composite.spec, composite.name
        wanted = (
            {f"{name}.{port}": (ref, ("outputs", port)) for port, ref in spec.outputs.items()}
            if spec.outputs
            else {name: (spec.output or _entry_name(spec.blocks[-1], ()), ("output",))}
        )
        for alias, (ref, where) in wanted.items():
            found = self._resolve(ref, (name,))
            inputs = {f"{name}.{i}" for i in spec.inputs}
            if found is None or f"{name}.{ref}" in inputs:
                self._errors.append(
                    GraphError(
                        f"the output of {_op_label(spec)} names '{ref}', which is not one of its blocks",
                        pos=self.pos(composite.path + where),
                        node=name,
                        hint=f"its blocks: {', '.join(b.name or b.op for b in spec.blocks)}",
                    )
                )
                found = self._resolve(_entry_name(spec.blocks[-1], ()), (name,))  # go on with the last block
                if found is None:
                    continue
            self.aliases[alias] = found

    def _connect(self, src: str, dst: str, port: int, out: str | None) -> None:
        self._g.add_edge(src, dst, key=port, port=port, out=out)
        self._order = None

    def _resolve(self, ref: str, scopes: tuple[str, ...]) -> tuple[str, str | None] | None:
        """A ``from:`` reference → (node, output port); local names are tried in the innermost scope first."""
        candidates = [f"{scope}.{ref}" for scope in scopes] + [ref]
        for name in candidates:
            if (found := self.value_of(name)) is not None:
                return found
        for name in candidates:
            head, _, port = name.rpartition(".")
            if head in self.groups and port.isdigit():  # a repetition that does not exist, not a port
                continue
            if head in self.groups and self.groups[head]:
                head = self.groups[head][-1]
            if f"{head}.{port}" in self.aliases:  # a port of a composite
                return self.aliases[f"{head}.{port}"]
            if head in self.nodes and port:
                return head, port
        return None

    def value_of(self, name: str) -> tuple[str, str | None] | None:
        """The node (and port) that gives the value of a node, an alias (a composite, its port or input) or a
        repeated block (its last) named ``name``; None for another name."""
        if name in self.nodes:
            return name, None
        if name in self.aliases:
            return self.aliases[name]
        if name in self.groups and self.groups[name]:
            return self.value_of(self.groups[name][-1])
        return None

    def _sources(self, name: str) -> list[tuple[str, str | None]]:
        """What reading ``name`` whole gives: its value, or each of its ports in order (a multi-output block)."""
        composite = self.composites.get(name)
        if composite is not None and composite.spec.outputs:
            return [
                self.aliases[f"{name}.{port}"] for port in composite.spec.outputs if f"{name}.{port}" in self.aliases
            ]
        found = self.value_of(name)
        if found is None:
            return []
        src, out = found
        ports = self.ports(src) if out is None else None
        return [(src, p) for p in ports] if ports else [found]

    def ports(self, name: str) -> tuple[str, ...] | None:
        """The output ports of a node (None: it has one output)."""
        spec = self.nodes[name].spec
        return spec.output_ports() if spec is not None else None

    def _reference_error(self, ref: str, path: Path, node: str | None, scopes: tuple[str, ...]) -> GraphError:
        head, _, index = ref.rpartition(".")
        for group in [f"{s}.{head}" for s in scopes] + [head]:
            if index.isdigit() and group in self.groups:
                count = len(self.groups[group])
                return GraphError(
                    f"unknown reference '{ref}': '{group}' has {count} repetition{'s' if count != 1 else ''}"
                    f" (0..{count - 1})",
                    pos=self.pos(path),
                    node=node,
                    hint=f"did you mean '{head}.{count - 1}' (the last), or '{head}'?",
                )
        known = list(self.nodes) + list(self.groups)
        local = [n.removeprefix(f"{s}.") for s in scopes for n in known if n.startswith(f"{s}.")]
        close = difflib.get_close_matches(ref, local + known, n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else None
        if hint is None:
            hint = "a reference names a block declared earlier (`stage2.to_map`), or a model input"
        return GraphError(f"unknown reference '{ref}'", pos=self.pos(path), node=node, hint=hint)

    def _port_error(self, found: tuple[str, str | None], ref: str, path: Path, node: str) -> GraphError | None:
        src, port = found
        ports = self.ports(src)
        if port is None and ports:
            return GraphError(
                f"'{src}' has several outputs; name one of them: {', '.join(f'{src}.{p}' for p in ports)}",
                pos=self.pos(path),
                node=node,
                hint=f"e.g. `from: {ref}.{ports[0]}`",
            )
        if port is not None and port not in (ports or ()):
            listed = ", ".join(ports) if ports else "none: it has a single output"
            close = difflib.get_close_matches(port, list(ports or ()), n=1)
            return GraphError(
                f"'{src}' has no output port '{port}'",
                pos=self.pos(path),
                node=node,
                hint=(f"did you mean '{close[0]}'? " if close else "") + f"ports of '{src}': {listed}",
            )
        return None

    def _shared_ref(
        self, ref: str, path: Path, field_name: str, ops: tuple[str, ...], node: str, scopes: tuple[str, ...]
    ) -> str | None:
        """Resolve a shared-module name (innermost scope first, then global) and check its op; report errors."""
        qualified = next((q for q in [f"{s}.{ref}" for s in scopes] + [ref] if q in self.shared), None)
        stage = scopes[0] if scopes else None
        if qualified is None:
            visible = [k.removeprefix(f"{stage}.") for k in self.shared if stage and k.startswith(f"{stage}.")]
            visible += [k for k in self.shared if not (stage and k.startswith(f"{stage}."))]
            close = difflib.get_close_matches(ref, visible, n=1)
            hint = (
                f"did you mean '{close[0]}'?"
                if close
                else (f"shared modules here: {', '.join(visible)}" if visible else "declare it under `shared:`")
            )
            self._errors.append(GraphError(f"unknown shared module '{ref}'", pos=self.pos(path), node=node, hint=hint))
            return None
        target = self.shared[qualified]
        if target.spec.op not in ops:
            fitting = [
                k.rpartition(".")[2] if stage and k.startswith(f"{stage}.") else k
                for k, m in self.shared.items()
                if m.spec.op in ops
            ]
            self._errors.append(
                GraphError(
                    f"'{field_name}' needs a shared module of op {' or '.join(ops)}, '{ref}' is {target.spec.op}",
                    pos=self.pos(path),
                    node=node,
                    hint=f"{' or '.join(ops)} here: {', '.join(fitting)}"
                    if fitting
                    else f"declare a {ops[0]} module under `shared:`",
                )
            )
            return None
        return qualified


def _module_names(g: Graph) -> list[tuple[str, Pos, str | None]]:
    """Each module the compiler installs (a node's own, a shared one), with where its name is written."""
    names: list[tuple[str, Pos, str | None]] = []
    for shared in g.shared.values():
        names.append((shared.name, g.pos(shared.path), shared.name))
    for node in g.nodes.values():
        if node.is_input or node.module is not None:
            continue
        named = node.spec is not None and node.spec.name is not None
        names.append((node.name, g.pos(node.path + ("name",) if named else node.path), node.name))
    return names


def _namespaces(g: Graph) -> dict[str, tuple[Pos, str | None]]:
    """Where the namespaces of module names are named: stages, their paths, blocks made of blocks."""
    spaces: dict[str, tuple[Pos, str | None]] = {}
    for i, stage in enumerate(g.spec.stages):
        spaces[stage.name] = (g.pos(("stages", i, "name")), stage.name)
        for k, path in enumerate(stage.paths):
            name = f"{stage.name}.{path.name}"
            spaces[name] = (g.pos(("stages", i, "paths", k, "name")), name)
    for name, composite in g.composites.items():
        spaces[name] = (g.pos(composite.path + ("name",)), name)
    return spaces


def _entry_name(block: BlockSpec, scopes: tuple[str, ...]) -> str:
    local = block.name or block.op
    return f"{scopes[0]}.{local}" if scopes else local


def _last_name(entries: list[Any]) -> str | None:
    if not entries:
        return None
    block, _, _, scopes, *_ = entries[-1]
    return _entry_name(block, scopes)


def _op_label(block: BlockSpec) -> str:
    """``op 'mlp'``, or ``block 'convnext_block'`` for a use of a defined block."""
    return f"block '{block.label}'" if isinstance(block, CompositeBase) else f"op '{block.op}'"


def _flatten(g: Graph, entries: list[Any]) -> list[Any]:
    """The entries with each composite's blocks after it (recursively), scoped by and owned by the composite: its
    first block reads the composite's inputs (``<composite>.<input>``, aliases set when the composite's own inputs
    are resolved). Each entry gains a last item: the name of the module it calls when that is not its own (a ``use``
    of a shared block becomes a composite whose blocks call the shared declaration's modules), else None."""
    out = []
    for block, path, stage, scopes, defaults, owner, *given in entries:
        module = given[0] if given else None
        if isinstance(block, UseSpec):
            shared = g._shared_block(block, path, scopes)
            if shared is None:
                continue
            shared.users.append(_entry_name(block, scopes))
            block = shared.spec.model_copy(update={"name": block.name or block.op, "from_": block.from_})
            path, module = shared.path, shared.name
        out.append((block, path, stage, scopes, defaults, owner, module))
        if isinstance(block, CompositeBase):
            name = _entry_name(block, scopes)
            first = [f"{name}.{i}" for i in block.inputs]  # its blocks see its names, then the enclosing ones
            inner = [
                (b, path + ("blocks", j), stage, (name, *scopes), first if j == 0 else None, name,
                 None if module is None else f"{module}.{_entry_name(b, ())}")  # the parts of a use: the shared's
                for j, b in enumerate(block.blocks)
            ]  # fmt: skip
            out += _flatten(g, inner)
    return out


def _cycles(g: nx.MultiDiGraph) -> list[list[str]]:
    """One cycle per strongly connected component that has one (self-loops included)."""
    out = []
    for component in nx.strongly_connected_components(g):
        if len(component) == 1:
            (only,) = component
            if not g.has_edge(only, only):
                continue
        out.append([u for u, *_ in nx.find_cycle(g.subgraph(component), source=min(component))])
    return sorted(out)


def build_graph(parsed: ParsedSpec) -> Graph:
    """Build the dataflow graph of a parsed spec and lint it.

    Raises:
        GraphError: (or a MultiError) for every error :meth:`Graph.lint` finds; warnings stay on
        ``graph.warnings``.
    """
    g = Graph(parsed)
    spec = parsed.model
    for name in spec.input_specs():
        g._add(Node(name, None, ("inputs", name) if spec.inputs else ("input",), index=0))

    # 1. Shared modules: global ones by their name, stage ones as `stage.name`.
    def add_shared(scope: str | None, table: dict[str, BlockSpec], base: Path) -> None:
        for key, block in table.items():
            qualified = f"{scope}.{key}" if scope else key
            table_here = g.shared_blocks if isinstance(block, CompositeBase) else g.shared  # applied by `use`
            table_here[qualified] = SharedModule(qualified, block, base + (key,))

    add_shared(None, spec.shared, ("shared",))
    for i, stage in enumerate(spec.stages):
        add_shared(stage.name, stage.shared, ("stages", i, "shared"))
        for k, path in enumerate(stage.paths):
            add_shared(f"{stage.name}.{path.name}", path.shared, ("stages", i, "paths", k, "shared"))

    # 2. Nodes, in declaration order (names only; edges need every name first). An entry is (block, spec path,
    #    stage, lookup scopes, default inputs: None = the previous entry, the composite it belongs to: None = the
    #    model); _flatten adds the blocks of composites and a last item, the module a node calls if not its own.
    entries: list[tuple[BlockSpec, Path, str | None, tuple[str, ...], list[str] | None, str | None]] = []
    for i, stage in enumerate(spec.stages):
        here = (stage.name,)
        entries += [(b, ("stages", i, "blocks", j), stage.name, here, None, None) for j, b in enumerate(stage.blocks)]
        before_paths = _last_name(entries) or spec.input.name
        path_ends: list[str] = []
        for k, path in enumerate(stage.paths):
            scope = (f"{stage.name}.{path.name}", stage.name)
            first = len(entries)
            for j, b in enumerate(path.blocks):
                inputs = [before_paths] if j == 0 else None
                entries.append((b, ("stages", i, "paths", k, "blocks", j), stage.name, scope, inputs, None))
            if len(entries) > first:
                path_ends.append(_last_name(entries))
        if stage.merge is not None:
            entries.append((stage.merge, ("stages", i, "merge"), stage.name, here, path_ends, None))
        elif stage.paths:
            g._errors.append(
                GraphError(
                    f"stage '{stage.name}' has paths but no `merge:`",
                    pos=g.pos(("stages", i, "paths")),
                    node=stage.name,
                    hint="add `merge: {name: ..., op: ...}` to join the paths (it reads each path's last block)",
                )
            )
    entries += [(b, ("blocks", j), None, (), None, None) for j, b in enumerate(spec.blocks)]
    entries = _flatten(g, entries)
    parent: dict[str, str | None] = {}  # a composite → the composite it is declared in
    for index, entry in enumerate(entries, start=1):
        block, path, stage, scopes, _, owner, module = entry
        name = _entry_name(block, scopes)
        head, _, tail = name.rpartition(".")
        node = Node(name, block, path, index, stage, scopes, module=module)
        if tail.isdigit():
            if head in g.nodes:  # a plain block already has the repeated block's name
                g._add(Node(head, block, path, index, stage, scopes))  # reports the duplicate
                continue
            g.groups.setdefault(head, []).append(name)
        if isinstance(block, CompositeBase):
            g._add_composite(Composite(name, block, path, scopes[0] if scopes else ""))
            parent[name] = owner
            continue
        g._add(node)
        while owner in g.composites and g.nodes.get(name) is node:  # every enclosing composite counts it
            g.composites[owner].members.append(name)  # type: ignore[index]
            owner = parent.get(owner)  # type: ignore[arg-type]
    for composite in reversed(list(g.composites.values())):  # inner ones first: an output may be a composite
        g._composite_outputs(composite)

    # 3. Edges: explicit `from:`, else the default (previous entry, the stage's last block for a path's first
    #    block, each path's last block for a merge), and shared references.
    previous: dict[str | None, str] = {None: spec.input.name}
    for block, path, _stage, scopes, defaults, owner, _module in entries:
        name = _entry_name(block, scopes)
        found_node, composite = g.nodes.get(name), g.composites.get(name)
        if (found_node is None or found_node.spec is not block) and (composite is None or composite.spec is not block):
            continue  # a duplicate, already reported
        refs = [block.from_] if isinstance(block.from_, str) else block.from_
        if refs is None:  # a multi-output source gives all its ports (in order)
            sources: list[tuple[str, str | None]] = []
            for src in defaults if defaults is not None else [previous[owner]]:
                sources += g._sources(src)
        else:
            sources = []
            for k, ref in enumerate(refs):
                ref_path = path + ("from",) + ((k,) if isinstance(block.from_, list) else ())
                found = g._resolve(ref, scopes)
                if found is None:
                    g._errors.append(g._reference_error(ref, ref_path, name, scopes))
                elif (error := g._port_error(found, ref, ref_path, name)) is not None:
                    g._errors.append(error)
                else:
                    sources.append(found)
        previous[owner] = name
        arity = len(block.inputs) if isinstance(block, CompositeBase) else type(block).arity
        complete = refs is None or len(sources) == len(refs)  # else the missing references are reported already
        if arity is not None and complete and len(sources) != arity:
            hint = f"name {arity} input{'s' if arity != 1 else ''} with `from: [...]`"
            several = next((src for src, out in sources if out is not None), None) if refs is None else None
            if several is not None:
                ports = ", ".join(f"{several}.{p}" for p in g.ports(several) or ())
                hint = f"'{several}' has several outputs ({ports}): read one, e.g. `from: {ports.split(', ')[0]}`"
            g._errors.append(
                GraphError(
                    f"{_op_label(block)} takes {arity} input{'s' if arity != 1 else ''}, "
                    f"{'`from:`' if refs is not None else 'the previous block'} gives {len(sources)}",
                    pos=g.pos(path + ("from",)),
                    node=name,
                    hint=hint,
                )
            )
        if composite is not None:  # its blocks read its inputs by their local names
            for local, source in zip(block.inputs, sources, strict=False):  # type: ignore[attr-defined]
                g.aliases[f"{name}.{local}"] = source
            continue
        for port, (src, out) in enumerate(sources):
            g._connect(src, name, port, out)
        for field_name, marker in type(block).shared_fields().items():
            value = getattr(block, field_name)
            refs_here = (
                [(value, path + (field_name,))]
                if isinstance(value, str)
                else [(v, path + (field_name, k)) for k, v in enumerate(value)]
            )
            resolved = [
                g._shared_ref(ref, field_path, field_name, marker.ops, name, scopes) for ref, field_path in refs_here
            ]
            if any(q is None for q in resolved):
                continue
            found_node.shared[field_name] = resolved[0] if isinstance(value, str) else resolved  # type: ignore[assignment]
            for q in resolved:
                g.shared[q].users.append(name)  # type: ignore[index]

    # 4. Outputs.
    for table, attr in ((spec.output_specs(), "outputs"), (spec.features, "features")):
        for key, out in table.items():
            path = (attr, key)
            found = g._resolve(out.from_, ())
            if found is None:
                g._errors.append(g._reference_error(out.from_, path + ("from",), None, ()))
                continue
            getattr(g, attr)[key] = Output(key, found[0], found[1], out, path)
    if not entries:
        g._errors.append(
            GraphError("the spec has no blocks", pos=g.pos(()), hint="add `stages:` (with `blocks:`) or `blocks:`")
        )
    for name in spec.default_outputs or []:
        if name not in g.outputs and name not in g.features:
            g._errors.append(GraphError(f"default output '{name}' is not declared", pos=g.pos(("default_outputs",))))
    for key, shared in {**g.shared, **g.shared_blocks}.items():
        if not shared.users:
            g._errors.append(
                GraphError("shared module is used by no block", pos=g.pos(shared.path), node=key, warning=True)
            )

    g._errors += module_name_errors(_module_names(g), _namespaces(g))
    problems = g.lint()
    g.warnings = [p for p in problems if p.kind == "warning"]
    raise_all([p for p in problems if p.kind != "warning"])
    return g
