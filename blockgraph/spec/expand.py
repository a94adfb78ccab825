"""Expand a positioned spec tree into plain data: ``extends:``, ``variants:``, variables, expressions, templates.

The result is plain JSON-like data (what the pydantic schema parses) plus a :class:`SourceMap` from every path in
that data back to the place in a file that produced it, so later stages can point at the exact value.

Language (on top of YAML):

* ``extends: parent.yaml``: deep-merge this file over the parent (mappings merge key by key, anything else is
  replaced; ``key: null`` deletes an inherited key); paths are relative to the file that says it, then to the
  reference specs' directory (``extends: coat_lite.yaml`` works from anywhere). A file that declares ``variants:`` replaces the parent's
  variants instead of merging them.
* ``variants: {small: {...}}`` with ``variant: small`` (in the spec, or chosen by the caller): deep-merge the
  variant's mapping over the spec.
* ``variables: {dims: [64, 128], heads: 8}``: values usable as ``${dims[1] // heads}`` anywhere below; a variable
  may use other variables. A scalar that is exactly one ``${...}`` takes the expression's type; otherwise the
  values are formatted into the text (``stage${i + 1}``).
* ``- for: {i: [0, 1, 2, 3]}`` as a list item: the item is repeated once per value (several names are zipped),
  with the names bound in its expressions.
* ``- if: ${cond}`` as a list item: the item is kept only when the condition is true.
* ``depth: N`` on an entry of a ``blocks`` list: the entry is repeated N times as ``name.0`` ... ``name.N-1``, with
  ``rep`` bound to the repetition index; its ``from:`` wires the first repetition, each later one reads the one
  before it.
* ``imports: [my_pkg.blocks, ./blocks/convnext.py]``: the modules of custom blocks the spec needs, by dotted name
  or as ``.py`` files relative to the file that lists them; inherited through ``extends:`` and variants (a union,
  the parent's first). They are only collected here (:attr:`Expanded.imports`): ``blockgraph.spec.plugins`` loads
  them, before parsing.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from blockgraph.errors import Pos, SpecError, excerpt, shorten
from blockgraph.spec import expr
from blockgraph.spec.define import COMPOSITE_OP, Definition, bind, definitions
from blockgraph.spec.load import MISSING, Node, load_file, load_text, regular_file_kind
from blockgraph.spec.patch import PATCHES, Entry, apply, directives, merge, merge_spec, path_patch
from blockgraph.spec.references import SPEC_DIR, nearest_hint

Path = tuple[Any, ...]
MAX_EXTENDS = 32
MAX_EXPANDED = 10_000
"""Upper bound on the number of entries produced by templates and repeats."""
REP = "rep"
IMPORTS = "imports"
DEFINE = "define"
RESERVED = {"extends", "variant", "variants", "variables", IMPORTS, DEFINE}
LIBRARY_SUFFIXES = (".yaml", ".yml")
"""An ``imports:`` entry with one of these suffixes is a library of blocks defined in YAML, not Python."""
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass
class SourceMap:
    """Where each value of the expanded spec came from: paths (``("stages", 0, "blocks", 2, "dim")``) to positions."""

    file: str
    values: dict[Path, Pos] = field(default_factory=dict)
    keys: dict[Path, Pos] = field(default_factory=dict)

    def value(self, path: Path) -> Pos:
        """The position of the value at ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return self.values.get((), Pos(self.file))

    def key(self, path: Path) -> Pos:
        """The position of the key that names ``path`` (falls back to the value's position)."""
        path = tuple(path)
        return self.keys.get(path) or self.value(path)

    def resolve(self, loc: tuple[Any, ...]) -> Path:
        """Map a location as pydantic reports it onto a path of this map, skipping what the data has no trace of
        (the discriminator tag pydantic inserts for a union member, say)."""
        path: Path = ()
        for part in loc:
            if path + (part,) in self.values or path + (part,) in self.keys:
                path += (part,)
        return path


def names_a_file(entry: str) -> bool:
    """Whether an ``imports:`` entry (or a ``--plugin`` value) names a ``.py`` file rather than a module: it ends
    with ``.py`` or has a path separator."""
    return entry.endswith((".py", *LIBRARY_SUFFIXES)) or "/" in entry or os.sep in entry


@dataclass(frozen=True)
class Import:
    """An entry of ``imports:``: a dotted module name, or a ``.py`` file as an absolute path (symbolic links
    resolved), and where it was written."""

    name: str
    pos: Pos
    written: str
    """The entry as written (a file's path relative to its spec)."""

    @property
    def is_file(self) -> bool:
        return names_a_file(self.name)

    @property
    def is_library(self) -> bool:
        """A YAML file of ``define:`` blocks (read by :func:`expand`), not a module of custom blocks."""
        return self.name.endswith(LIBRARY_SUFFIXES)


@dataclass
class Expanded:
    """The output of :func:`expand`: plain data, where it came from, and how it was made."""

    data: dict[str, Any]
    source: SourceMap
    variant: str | None = None
    imports: list[Import] = field(default_factory=list)
    """The modules of custom blocks the spec imports (``imports:``), in order, each once; not loaded here."""
    defined: dict[str, Pos] = field(default_factory=dict)
    """The blocks defined in YAML that the spec can use (its ``define:`` and its libraries'), with their positions."""
    root: str | None = None
    """The directory the spec was confined to (``expand(root=...)``): its ``imports:`` files are under it, and
    modules it names are not imported (only used if already loaded)."""

    def standalone(self) -> dict[str, Any]:
        """The data as a spec of its own (no `extends:`, no expressions, no variant to choose, files imported by
        absolute path): what a checkpoint embeds to rebuild the model."""
        data = {k: v for k, v in self.data.items() if k != "variant"}
        return {IMPORTS: [i.name for i in self.imports], **data} if self.imports else data


# ----------------------------------------------------------------------------------------------------- extends / merge


def _imports(node: Node | None, within: str | None) -> list[Import]:
    """The entries of ``imports:``, files resolved against the directory of the file that lists them, each once
    (a file outside ``within``, the ``root`` of :func:`expand`, is refused)."""
    if node is None:
        return []
    if not node.is_list:
        raise SpecError(
            "`imports:` takes a list of modules of custom blocks",
            pos=node.pos,
            hint="e.g. `imports: [my_pkg.blocks, ./blocks/convnext.py]`",
        )
    out: dict[str, Import] = {}
    for item in node.value:
        entry = item.value
        if isinstance(entry, str) and names_a_file(entry):
            here = os.path.dirname(item.pos.file) if os.path.exists(item.pos.file) else os.getcwd()
            name = os.path.realpath(os.path.join(here, entry))
            _check_within(name, within, "`imports:` names a file", item.pos)
        elif isinstance(entry, str) and _MODULE_NAME.fullmatch(entry):
            name = entry
        else:
            raise SpecError(
                f"`imports:` entry {excerpt(entry)} is neither a module name nor a .py file",
                pos=item.pos,
                hint="write a dotted module name (`my_pkg.blocks`) or a path ending in .py, relative to this file "
                "(`./blocks/convnext.py`)",
            )
        out.setdefault(name, Import(name, item.pos, entry))
    return list(out.values())


def _resolve_extends(root: Node, file: str, chain: list[str], within: str | None) -> Node:
    parent = root.get("extends")
    if parent is None:
        return merge_spec(Node({}, root.pos), root) if any("." in str(k) for k in root.value) else root
    if not isinstance(parent.value, str) or not parent.value:
        raise SpecError("`extends:` takes a file name (a path relative to this file)", pos=parent.pos)
    here = os.path.dirname(file) if os.path.exists(file) else os.getcwd()
    target = os.path.normpath(os.path.join(here, parent.value))
    shown = " -> ".join([*chain, target])
    if os.path.abspath(target) in {os.path.abspath(c) for c in chain}:
        raise SpecError(f"`extends:` forms a cycle: {shown}", pos=parent.pos, hint="remove one of the `extends:` lines")
    if len(chain) >= MAX_EXTENDS:
        raise SpecError(f"`extends:` chain is deeper than {MAX_EXTENDS}: {shown}", pos=parent.pos)
    if not os.path.lexists(target) and not os.path.isabs(parent.value):  # then among the reference specs, by name
        target = _reference(parent.value) or target
    kind = regular_file_kind(target)
    if kind == MISSING:
        raise SpecError(
            f"`extends:` names a file that does not exist: {target}",
            pos=parent.pos,
            hint=f"the path is relative to {here or '.'}, then to the reference specs ({SPEC_DIR}), where a name "
            f"may leave out .yaml; {nearest_hint(parent.value)}; chain: {shown}",
        )
    if kind is not None:
        raise SpecError(
            f"`extends:` names {kind}, not a spec file: {target}", pos=parent.pos, hint="name a .yaml spec file"
        )
    if not target.endswith(LIBRARY_SUFFIXES):
        raise SpecError(
            f"`extends:` names a file that is not a spec (.yaml or .yml): {target}",
            pos=parent.pos,
            hint="a parent spec is a YAML file whose name ends in .yaml or .yml",
        )
    _check_within(target, within, "`extends:` names a file", parent.pos)
    base = _resolve_extends(load_file(target), target, [*chain, target], within)
    child = Node({k: v for k, v in root.value.items() if k != "extends"}, root.pos, root.key_pos)
    chosen = child.get("variant")
    if chosen is not None and "variants" not in child.value:
        # The child picks one of the parent's variants: parent < variant < the child's own values.
        base, _ = _apply_variant(Node({**base.value, "variant": chosen}, base.pos, base.key_pos), None)
        child = Node({k: v for k, v in child.value.items() if k != "variant"}, child.pos, child.key_pos)
        child.meta["variant"] = chosen.value
    if "variants" in child.value and base.is_map:  # a family of its own: the parent's sizes do not carry over
        base = Node({k: v for k, v in base.value.items() if k != "variants"}, base.pos, base.key_pos)
    merged = merge_spec(base, child)
    merged.meta.update(child.meta)
    return merged


def _reference(name: str) -> str | None:
    """The reference spec ``name`` names (``coat_lite`` or ``coat_lite.yaml``), if there is one in ``SPEC_DIR``."""
    specs = os.path.realpath(SPEC_DIR)
    for candidate in (name, f"{name}.yaml"):
        path = os.path.normpath(os.path.join(SPEC_DIR, candidate))
        if os.path.isfile(path) and _inside(os.path.realpath(path), specs):
            return path
    return None


def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or under it (both absolute, symbolic links resolved)."""
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:  # on different drives
        return False


def _check_within(path: str, within: str | None, what: str, pos: Pos) -> None:
    """Refuse ``path`` (symbolic links resolved) when it is outside ``within`` (the ``root`` of :func:`expand`) and
    is not one of the reference specs (which extend each other)."""
    real = os.path.realpath(path)
    if within is not None and not _inside(real, within) and not _inside(real, os.path.realpath(SPEC_DIR)):
        raise SpecError(
            f"{what} outside the directory specs may read ({within}): {path}",
            pos=pos,
            hint="a spec checked with a root (`--root DIR`) may only read files under it, and the reference specs",
        )


def _apply_variant(root: Node, chosen: str | None) -> tuple[Node, str | None]:
    variants = root.get("variants")
    own = root.get("variant")
    name = chosen if chosen is not None else (own.value if own is not None else None)
    body = {k: v for k, v in root.value.items() if k not in ("variants", "variant")}
    if name is None:
        return Node(body, root.pos), None
    where = own.pos if (chosen is None and own is not None) else Pos("<variant argument>")
    if variants is None or not variants.is_map or not variants.value:
        raise SpecError(
            f"variant {excerpt(name)} asked for, but this spec declares no `variants:`",
            pos=where,
            hint="remove `variant:`, or declare `variants: {NAME: {variables: {...}}}` in this spec or its parent",
        )
    by_text = {str(k): k for k in variants.value}  # `variant: 5` names the variant `5:` (or `"5":`)
    if isinstance(name, bool) or not isinstance(name, str | int) or str(name) not in by_text:
        names = list(by_text)
        if not isinstance(name, str | int) or isinstance(name, bool):
            raise SpecError(
                f"`variant:` must be a variant's name, got a {type(name).__name__}",
                pos=where,
                hint=f"variants: {shorten(', '.join(names), 200)}",
            )
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SpecError(
            f"unknown variant {excerpt(str(name))}", pos=where, hint=f"{hint}variants: {shorten(', '.join(names), 200)}"
        )
    name = by_text[str(name)]
    variant = variants.value[name]
    if not variant.is_map:
        raise SpecError(f"variant '{name}' must be a mapping of overrides", pos=variant.pos)
    merged = merge_spec(Node(body, root.pos), variant)
    if chosen is not None and "name" not in variant.value and "name" in body:
        base_name = body["name"]
        merged.value["name"] = Node(f"{base_name.value}_{name}", base_name.pos, base_name.key_pos)
    return merged, name


# ------------------------------------------------------------------------------------------------------------ scopes


class _Variables(Mapping[str, Any]):
    """Spec variables, evaluated on first use (so they may refer to each other), with cycle detection."""

    def __init__(self, defs: dict[str, Node], expander: _Expander):
        self.defs = defs
        self.expander = expander
        self.values: dict[str, Any] = {}
        self.active: list[str] = []

    def __getitem__(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        if name not in self.defs:
            raise KeyError(name)
        node = self.defs[name]
        if name in self.active:
            cycle = " -> ".join([*self.active[self.active.index(name) :], name])
            raise SpecError(
                f"variables refer to each other in a cycle: {cycle}",
                pos=node.pos,
                hint="give one of them a value that does not depend on the others in the cycle",
            )
        self.active.append(name)
        try:
            value = self.expander.evaluate(node, self, ("variables", name), record=False)
        finally:
            self.active.pop()
        self.values[name] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.defs)

    def __len__(self) -> int:
        return len(self.defs)

    def __contains__(self, name: object) -> bool:
        return name in self.defs


def _bound(bindings: dict[str, Any], outer: Mapping[str, Any]) -> Mapping[str, Any]:
    """Loop bindings layered over an outer scope (which is only read: its variables evaluate when looked up)."""
    return ChainMap(bindings, outer)  # type: ignore[arg-type]  (typeshed wants mutable maps; nothing writes)


# ---------------------------------------------------------------------------------------------------------- expander


class _Expander:
    def __init__(self, file: str):
        self.source = SourceMap(file)
        self.produced = 0
        self.variables: _Variables | None = None
        self.collect: list[Path] | None = None
        """While a repetition is evaluated: the paths it records (to note the repetition on their positions)."""
        self.defines: dict[str, Definition] = {}
        self.using: list[str] = []
        self.names: dict[Path, str] = {}
        """The names of the list items evaluated so far, by path (for messages)."""
        """The definitions being instantiated, outermost first (a definition may not use itself)."""

    def record(self, path: Path, node: Node) -> None:
        if path not in self.source.values and self.collect is not None:
            self.collect.append(path)
        self.source.values.setdefault(path, node.pos)
        if node.key_pos is not None:
            self.source.keys.setdefault(path, node.key_pos)

    def evaluate(self, node: Node, scope: Mapping[str, Any], path: Path, *, record: bool = True) -> Any:
        if record:
            self.record(path, node)
        if node.is_map:
            value = {key: self.evaluate(v, scope, path + (key,), record=record) for key, v in node.value.items()}
            op = value.get("op")
            return self.instantiate(value, node, path) if isinstance(op, str) and op in self.defines else value
        if node.is_list:
            return self.evaluate_list(node, scope, path, record=record)
        if isinstance(node.value, str) and "${" in node.value:  # an expression, or an escaped `$${`
            return self.scalar(node, scope, path, record)
        return node.value

    def instantiate(self, value: dict[str, Any], use: Node, path: Path) -> dict[str, Any]:
        """A use of a defined block (``value``: the use, evaluated) as a composite block: the definition's blocks
        evaluated with the use's parameters (and only those), each position noting the use site."""
        definition = self.defines[value["op"]]
        if definition.name in self.using:
            cycle = " -> ".join([*self.using[self.using.index(definition.name) :], definition.name])
            op = use.get("op")
            raise SpecError(
                f"defined block '{definition.name}' uses itself: {cycle}",
                pos=op.pos if op is not None else use.pos,
                hint="a definition can use other defined blocks, but not itself (repeat blocks with `depth:`)",
            )
        given = {k: v for k, v in value.items() if k not in ("op", "name", "from")}
        params = _Variables(bind(definition, given, use), self)
        outer = (self.variables, self.collect)
        self.variables, self.collect = params, []
        self.using.append(definition.name)
        try:
            composite: dict[str, Any] = {"op": COMPOSITE_OP, "name": value.get("name", definition.name)}
            if "from" in value:
                composite["from"] = value["from"]
            composite["define"] = definition.name
            composite["args"] = {k: params[k] for k in params.defs}
            composite["inputs"] = list(definition.inputs)
            composite["blocks"] = self.evaluate(definition.blocks, params, path + ("blocks",))
            for key in ("output", "outputs"):
                if (node := getattr(definition, key)) is not None:
                    composite[key] = self.evaluate(node, params, path + (key,))
            label = f"in block '{definition.name}' used"
            for recorded in self.collect:  # every value of the definition's blocks notes the use site
                self.source.values[recorded] = self.source.values[recorded].with_origin(use.pos, label)
                if recorded in self.source.keys:
                    self.source.keys[recorded] = self.source.keys[recorded].with_origin(use.pos, label)
        finally:
            collected = self.collect
            self.variables, self.collect = outer
            if self.collect is not None:
                self.collect.extend(collected)
            self.using.pop()
        return composite

    def scalar(self, node: Node, scope: Mapping[str, Any], path: Path, record: bool) -> Any:
        text = node.value
        start = 1 if node.meta.get("quoted") else 0
        try:
            value = expr.interpolate(text, scope)
        except expr.ExprError as e:
            raise SpecError(
                e.message,
                pos=node.pos.shifted(start + e.offset),
                hint=e.hint or f"in the expression {excerpt(text, 80)}",
            ) from None
        if record and self.variables is not None:
            used = [n for n in expr.names_used(text) if n in self.variables.defs]
            if used:  # point at the use, and remember the definition it came from
                origin = self.variables.defs[sorted(used)[0]]
                self.source.values[path] = node.pos.through(origin.pos, f"variable '{sorted(used)[0]}' defined")
        return value

    def evaluate_list(self, node: Node, scope: Mapping[str, Any], path: Path, *, record: bool) -> list[Any]:
        out: list[Any] = []
        is_blocks = bool(path) and path[-1] == "blocks"
        for entry in self._entries(node, scope, path):
            inner = _bound(entry.bindings, scope) if entry.bindings else scope
            if isinstance(entry.name, str):
                self.names[path + (len(out),)] = entry.name
            if is_blocks and entry.body.is_map and "depth" in entry.body.value:
                out.extend(self._repeat(entry.body, inner, path, len(out), record))
            else:
                self._count(entry.body.pos)
                out.append(self.evaluate(entry.body, inner, path + (len(out),), record=record))
        return out

    def _entries(self, node: Node, scope: Mapping[str, Any], path: Path) -> list[Entry]:
        """The concrete items of a list: templates repeated, guards applied, then the lists patching it merged in
        by name (:mod:`blockgraph.spec.patch`)."""
        entries = self._concrete(node.value, scope)
        for patch in node.meta.get(PATCHES, ()):
            what = self._shown(path)

            def value_of(value: Node, entry: Entry) -> Any:
                return self.evaluate(value, _bound(entry.bindings, scope), (), record=False)

            entries = apply(entries, self._concrete(patch.value, scope), what, patch.pos, value_of)
        for entry in entries:
            if given := directives(entry.body):
                key = next(iter(given))
                raise SpecError(
                    f"`{key}` on an item of a list that patches no inherited list",
                    pos=given[key].key_pos or given[key].pos,
                    hint="directives apply to a list of named items merged over an inherited one (by `extends:`, "
                    "a variant or --set); remove it",
                )
        return entries

    def _concrete(self, items: list[Node], scope: Mapping[str, Any]) -> list[Entry]:
        """Each item once per binding of its ``for:`` (an item without one once), unless its ``if:`` is false,
        with its name evaluated."""
        out = []
        for item in items:
            for bindings in self._template(item, scope):  # a template's bindings are never empty
                inner = _bound(bindings, scope) if bindings else scope
                body = Node({k: v for k, v in item.value.items() if k != "for"}, item.pos) if bindings else item
                if body.is_map and "if" in body.value:
                    guard = body.value["if"]
                    keep = self.evaluate(guard, inner, (), record=False)
                    if not isinstance(keep, bool):
                        raise SpecError(f"`if:` needs true or false, got {excerpt(keep)}", pos=guard.pos)
                    if not keep:
                        continue
                    body = Node({k: v for k, v in body.value.items() if k != "if"}, body.pos, meta=body.meta)
                entry = Entry(body, bindings)
                if body.is_map and "name" in body.value:
                    try:
                        entry.name = self.evaluate(body.value["name"], inner, (), record=False)
                    except SpecError:  # a name made per repetition (`${rep}`): none to patch; evaluated below
                        entry.name = None
                out.append(entry)
        return out

    def _template(self, item: Node, scope: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The bindings of each repetition of a list item: one empty set for an item without ``for:``."""
        loop = item.get("for")
        if loop is None:
            return [{}]
        if not loop.is_map or not loop.value:
            raise SpecError("`for:` takes a mapping of names to lists, e.g. `for: {i: [0, 1, 2, 3]}`", pos=loop.pos)
        columns: dict[str, list[Any]] = {}
        for name, values in loop.value.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise SpecError(f"`for:` variable {excerpt(name)} must be a name", pos=values.key_pos or values.pos)
            evaluated = self.evaluate(values, scope, (), record=False)
            if not isinstance(evaluated, list):
                raise SpecError(f"`for:` variable '{name}' needs a list of values", pos=values.pos)
            columns[name] = evaluated
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise SpecError(
                "`for:` lists have different lengths: " + ", ".join(f"{k}: {len(v)}" for k, v in columns.items()),
                pos=loop.pos,
                hint="the lists are zipped; give them the same length",
            )
        n = lengths.pop()
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]

    def _repeat(self, body: Node, scope: Mapping[str, Any], path: Path, start: int, record: bool) -> list[Any]:
        depth_node = body.value["depth"]
        depth = self.evaluate(depth_node, scope, (), record=False)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise SpecError(f"`depth` must be a non-negative integer, got {excerpt(depth)}", pos=depth_node.pos)
        if depth > MAX_EXPANDED - self.produced:  # fail before repeating anything
            raise SpecError(
                f"`depth` {depth:,} would expand the spec past the limit of {MAX_EXPANDED:,} entries",
                pos=depth_node.pos,
                hint=f"repeats and `for:` loops make at most {MAX_EXPANDED:,} entries in all (the largest reference "
                "model has 82 nodes)",
            )
        entries = []
        for rep in range(depth):
            self._count(depth_node.pos)
            item_path = path + (start + rep,)
            inner = _bound({REP: rep}, scope)
            # `from:` wires the first repetition; each later one reads the one before it.
            fields = {k: v for k, v in body.value.items() if k != "depth" and (rep == 0 or k != "from")}
            outer, self.collect = self.collect, []
            try:
                value = self.evaluate(Node(fields, body.pos), inner, item_path, record=record)
                label = f"in repetition {rep} of `depth: {depth}`"
                for recorded in self.collect:  # every value of this repetition says which one it is
                    self.source.values[recorded] = self.source.values[recorded].with_origin(depth_node.pos, label)
            finally:
                collected, self.collect = self.collect, outer
                if outer is not None:
                    outer.extend(collected)
            base = value.get("name", value.get("op"))
            if isinstance(base, str):
                value["name"] = f"{base}.{rep}"
            entries.append(value)
        return entries

    def _shown(self, path: Path) -> str:
        """A list's path as messages show it, items by name: ```stages.stage2.blocks```."""
        parts = [self.names.get(path[: i + 1], f"[{p}]") if isinstance(p, int) else str(p) for i, p in enumerate(path)]
        return f"`{'.'.join(parts)}`" if parts else "the list"

    def _count(self, pos: Pos) -> None:
        self.produced += 1
        if self.produced > MAX_EXPANDED:
            raise SpecError(f"templates and repeats produce more than {MAX_EXPANDED:,} entries", pos=pos)


def expand(
    spec: str | os.PathLike[str] | Node,
    *,
    variant: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    text: str | None = None,
    file: str | None = None,
    root: str | os.PathLike[str] | None = None,
    standalone: bool = False,
) -> Expanded:
    """Load (if needed) and expand a spec.

    Args:
        spec: a file path, or an already loaded :class:`Node` tree.
        variant: the variant to build (overrides the spec's own ``variant:``).
        overrides: variable values that replace the spec's (``{"depths": [1, 1, 1, 1]}``).
        text: YAML text to parse instead of reading ``spec`` (``file`` names it in messages).
        file: the name to show for ``text``.
        root: a directory outside which no file is read (for specs sent by others): the spec file itself, its
            ``extends:`` and its ``imports:`` files must be under it (symbolic links resolved), a reference spec
            excepted; modules named in ``imports:`` are not imported (:attr:`Expanded.root`).
        standalone: the spec must be complete in itself (:meth:`Expanded.standalone`, embedded in a checkpoint):
            what would read another file, ``extends:`` or an import of a YAML library of blocks, is an error.

    Raises:
        SpecError: the spec cannot be read or expanded, or reaches outside ``root``.
    """
    within = _root(root)
    if text is not None:
        file = file or "<string>"
        root = load_text(text, file)
    elif isinstance(spec, Node):
        root, file = spec, spec.pos.file
    else:
        file = os.fspath(spec)
        _check_within(file, within, "the spec file is", Pos(file))
        root = load_file(file)
    assert file is not None
    if standalone:
        _refuse_files(root)
    root = _resolve_extends(root, file, [file], within)
    inherited = root.meta.get("variant")  # chosen by an `extends:`-ing file for its parent
    root, chosen = _apply_variant(root, variant)
    chosen = chosen or inherited
    overrides = dict(overrides or {})
    own = root.get("variables")
    for name in [n for n in overrides if not (own is not None and own.is_map and n in own.value)]:
        if "." in name or (name in root.value and name not in RESERVED):  # a path into the spec, not a variable
            pos = Pos(f"<override {name}>")
            root = merge(root, path_patch(root, name, Node.from_plain(overrides.pop(name), pos), pos))

    expander = _Expander(file)
    defines, modules = _imported(_imports(root.get(IMPORTS), within), (), within)
    expander.defines.update(defines)
    expander.defines.update(definitions(root.get(DEFINE)))
    defs_node = root.get("variables")
    if defs_node is not None and not defs_node.is_map:
        raise SpecError("`variables:` must be a mapping of names to values", pos=defs_node.pos)
    defs: dict[str, Node] = dict(defs_node.value) if defs_node is not None else {}
    for name, node in defs.items():
        if not isinstance(name, str) or not name.isidentifier() or name == REP:
            raise SpecError(
                f"variable name {excerpt(name)} is not usable in expressions",
                pos=node.key_pos or node.pos,
                hint=f"use a Python-style identifier (letters, digits, '_'), not '{REP}' (reserved)",
            )
    for name, value in overrides.items():
        if name not in defs:
            close = difflib.get_close_matches(str(name), list(defs), n=1)
            raise SpecError(
                f"override of unknown variable {excerpt(name)}",
                pos=Pos("<overrides>"),
                hint=(f"did you mean '{close[0]}'? " if close else "")
                + f"variables: {', '.join(defs) or 'none'}; or a dotted path into the spec "
                "(`stages.stage4.blocks.blocks.depth`)",
            )
        defs[name] = Node.from_plain(value, Pos(f"<override {name}>"))
    variables = _Variables(defs, expander)
    expander.variables = variables

    body = Node({k: v for k, v in root.value.items() if k not in RESERVED}, root.pos)
    data = expander.evaluate(body, variables, ())
    data["variables"] = {name: variables[name] for name in defs}
    if chosen is not None:
        data["variant"] = chosen
    defined = {name: d.pos for name, d in expander.defines.items()}
    return Expanded(data, expander.source, chosen, modules, defined, within)


def _refuse_files(root: Node) -> None:
    """Refuse what would make a spec that must be complete in itself read a file: ``extends:``, YAML libraries."""
    hint = "a checkpoint embeds its spec expanded (no `extends:`, blocks of libraries written out): rebuild it"
    if (parent := root.get("extends")) is not None:
        raise SpecError("an embedded spec cannot `extends:` a file", pos=parent.pos, hint=hint)
    entries = root.get(IMPORTS)
    for item in entries.value if entries is not None and entries.is_list else []:
        if isinstance(item.value, str) and item.value.endswith(LIBRARY_SUFFIXES):
            raise SpecError(
                f"an embedded spec cannot import the block library {item.value!r} (a file)", pos=item.pos, hint=hint
            )


def _root(root: str | os.PathLike[str] | None) -> str | None:
    """The directory ``root`` names, symbolic links resolved (None for none)."""
    if root is None:
        return None
    path = os.path.realpath(root)
    if not os.path.isdir(path):
        raise SpecError(f"root {os.fspath(root)}: no such directory", pos=Pos("<root>"))
    return path


def _imported(
    entries: list[Import], chain: tuple[str, ...], within: str | None
) -> tuple[dict[str, Definition], list[Import]]:
    """What ``imports:`` entries bring: the blocks defined by its YAML libraries (and by the libraries those import,
    later ones winning), and the modules of custom blocks, each once, in order."""
    defines: dict[str, Definition] = {}
    modules: dict[str, Import] = {}
    for entry in entries:
        if entry.is_library:
            more, modules_there = _library(entry, chain, within)
            defines.update(more)
            for module in modules_there:
                modules.setdefault(module.name, module)
        else:
            modules.setdefault(entry.name, entry)
    return defines, list(modules.values())


def _library(entry: Import, chain: tuple[str, ...], within: str | None) -> tuple[dict[str, Definition], list[Import]]:
    """The blocks a YAML library defines (its ``define:``, through its own ``extends:``, over those of the libraries
    it imports), and the modules of custom blocks it imports."""
    if entry.name in chain:
        shown = " -> ".join([*chain, entry.name])
        raise SpecError(f"`imports:` of block libraries form a cycle: {shown}", pos=entry.pos, hint="remove one")
    kind = regular_file_kind(entry.name)
    if kind == MISSING:
        raise SpecError(
            f"`imports:` names a block library that does not exist: {entry.name}",
            pos=entry.pos,
            hint="a .yaml entry is a file of `define:` blocks, relative to the spec that imports it",
        )
    if kind is not None:
        raise SpecError(
            f"`imports:` names {kind}, not a block library: {entry.name}",
            pos=entry.pos,
            hint="a .yaml entry is a file of `define:` blocks, relative to the spec that imports it",
        )
    root = _resolve_extends(load_file(entry.name), entry.name, [entry.name], within)
    defines, modules = _imported(_imports(root.get(IMPORTS), within), (*chain, entry.name), within)
    defines.update(definitions(root.get(DEFINE)))
    return defines, modules
