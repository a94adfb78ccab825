"""Merging one spec tree over another: what ``extends:``, a variant and ``--set`` do.

Mappings merge key by key (``key: null`` deletes an inherited key). A list is replaced, except a list of named
items (mappings with a ``name``, as stages, paths and blocks are) merged over another: then items merge by name, as
Kubernetes' strategic merge patch does for its named lists:

* an item whose name is inherited is merged into that item (its ``blocks:`` merged by name in turn);
* an item with a new name is appended;
* ``$delete: true`` removes the inherited item of that name, ``$replace: true`` replaces it instead of merging;
* ``$before: NAME`` / ``$after: NAME`` put the item (new or inherited) next to another;
* an item ``- $replace: true`` of its own makes the whole list replace the inherited one.

The names of inherited items may be templates (``name: stage${i + 1}`` under ``for:``), so they are only known
once the templates expand: :func:`_merge` keeps the patching list beside the inherited one (:data:`PATCHES`) and
:func:`apply` merges them, item by item, as the expander produces the concrete items.

A key with dots (``stages.stage4.blocks.blocks.depth: 2``, at the top level of a spec or a variant, or as
``--set``) is a path into the spec: a mapping's key, or, in a list of named items, an item's name; it becomes the
nested patch :func:`path_patch` builds.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from blockgraph.errors import Pos, SpecError, excerpt, shorten
from blockgraph.spec.load import Node

PATCHES = "patches"
"""``Node.meta`` key of a list: the lists of named items merged over it, in order, applied as it expands."""
EXISTING = "existing"
"""``Node.meta`` key of a patch item made from a dotted path: it must name an inherited item."""
DELETE, REPLACE, BEFORE, AFTER = "$delete", "$replace", "$before", "$after"
DIRECTIVES = (DELETE, REPLACE, BEFORE, AFTER)
PATH_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+")
"""A dotted key: a path into the spec."""


def merge(base: Node, over: Node) -> Node:
    """``over`` merged onto ``base`` (see the module docstring)."""
    if base.is_list and over.is_list:
        return _merge_lists(base, over)
    if not (base.is_map and over.is_map):
        return over
    out = dict(base.value)
    for key, value in over.value.items():
        if value.value is None:  # `key: null` deletes what the parent (or base) set
            out.pop(key, None)
            continue
        out[key] = merge(out[key], value) if key in out else value
    return Node(out, over.pos, over.key_pos or base.key_pos)


def _merge_lists(base: Node, over: Node) -> Node:
    if any(_replaces_all(item) for item in over.value):
        return Node([i for i in over.value if not _replaces_all(i)], over.pos, over.key_pos)
    if base.value and over.value and _named(base.value) and _named(over.value):
        patches = [*base.meta.get(PATCHES, ()), over]
        return Node(base.value, base.pos, over.key_pos or base.key_pos, {**base.meta, PATCHES: patches})
    return over


def _replaces_all(item: Node) -> bool:
    """``- $replace: true``, an item of its own: the list replaces the inherited one."""
    if not (item.is_map and REPLACE in item.value and "name" not in item.value):
        return False
    if len(item.value) > 1 or item.value[REPLACE].value is not True:
        raise SpecError(
            "`- $replace: true` alone makes this list replace the inherited one",
            pos=item.pos,
            hint="write it as an item of its own; to replace one inherited item, give it `name:` as well",
        )
    return True


def _named(items: Iterable[Node]) -> bool:
    return all(item.is_map and "name" in item.value for item in items)


def directives(item: Node) -> dict[str, Node]:
    """The ``$`` keys of a list item."""
    return {k: v for k, v in item.value.items() if isinstance(k, str) and k.startswith("$")} if item.is_map else {}


def without_directives(item: Node) -> Node:
    return Node({k: v for k, v in item.value.items() if k not in directives(item)}, item.pos, item.key_pos)


# ------------------------------------------------------------------------------------------------------- applying


@dataclass
class Entry:
    """A concrete item of a list being expanded: its body (``for:`` and ``if:`` removed), the names its template
    bound, and its name (only computed when the list is patched)."""

    body: Node
    bindings: dict[str, Any] = field(default_factory=dict)
    name: Any = None


def apply(
    entries: list[Entry],
    patch: list[Entry],
    what: str,
    pos: Pos,
    value_of: Callable[[Node, Entry], Any],
) -> list[Entry]:
    """The items of a list after one patching list: ``entries`` and ``patch`` are concrete items with their names;
    ``value_of(node, entry)`` evaluates a directive's value in the entry's scope. ``what`` names the list in
    messages (``stages``, ``blocks of stage2``); ``pos`` is where the patch was written."""
    out = list(entries)
    for item in patch:
        given = directives(item.body)
        for key, node in given.items():
            if key not in DIRECTIVES:
                close = difflib.get_close_matches(key, DIRECTIVES, n=1)
                raise SpecError(
                    f"unknown directive `{key}` on an item of {what}",
                    pos=node.key_pos or node.pos,
                    hint=(f"did you mean `{close[0]}`? " if close else "") + f"directives: {', '.join(DIRECTIVES)}",
                )
        for key in (DELETE, REPLACE):
            if key in given and given[key].value is not True:
                raise SpecError(f"`{key}` takes `true`", pos=given[key].pos, hint=f"remove `{key}` to merge the item")
        names = [e.name for e in out]
        at = names.index(item.name) if item.name in names else None
        name_node = item.body.get("name")
        if at is None and (DELETE in given or REPLACE in given or item.body.meta.get(EXISTING)):
            key = DELETE if DELETE in given else REPLACE if REPLACE in given else None
            raise SpecError(
                f"{what} has no item named {excerpt(item.name)}" + (f" to {key[1:]}" if key else ""),
                pos=name_node.pos if name_node is not None else item.body.pos,
                hint=_names_hint(item.name, names),
            )
        if DELETE in given:
            if set(item.body.value) - {"name", DELETE}:
                raise SpecError(
                    f"`{DELETE}: true` removes the item; it takes no other keys",
                    pos=given[DELETE].key_pos or given[DELETE].pos,
                )
            del out[at]  # type: ignore[arg-type]  (at is set: checked above)
            continue
        body = without_directives(item.body)
        if at is None or REPLACE in given:
            new = Entry(body, item.bindings, item.name)
        else:
            old = out[at]
            new = Entry(merge(old.body, body), {**old.bindings, **item.bindings}, item.name)
        if at is not None:
            del out[at]
        place = len(out) if at is None else at
        for key in (BEFORE, AFTER):
            if key in given:
                target = value_of(given[key], item)
                others = [e.name for e in out]
                if target not in others:
                    raise SpecError(
                        f"`{key}: {shorten(str(target))}`: {what} has no item named {excerpt(target)}",
                        pos=given[key].pos,
                        hint=_names_hint(target, others),
                    )
                place = others.index(target) + (key == AFTER)
        out.insert(place, new)
    return out


def _names_hint(name: Any, names: list[Any]) -> str:
    shown = [str(n) for n in names if n is not None]
    close = difflib.get_close_matches(str(name), shown, n=1)
    return (f"did you mean {close[0]!r}? " if close else "") + f"items: {', '.join(shown) or 'none'}"


# ------------------------------------------------------------------------------------------------------ dotted keys


def merge_spec(base: Node, over: Node) -> Node:
    """:func:`merge` of two whole specs (or of a spec and a variant): ``imports:`` lists add up (``base``'s first)
    and the dotted keys of ``over`` apply last, as paths into the merged spec."""
    paths = {k: v for k, v in over.value.items() if isinstance(k, str) and "." in k}
    plain = Node({k: v for k, v in over.value.items() if k not in paths}, over.pos, over.key_pos, over.meta)
    merged = merge(base, plain)
    inherited, own = base.get("imports"), over.get("imports")
    if inherited is not None and own is not None and inherited.is_list and own.is_list:
        merged.value["imports"] = Node([*inherited.value, *own.value], own.pos, own.key_pos)
    for key, value in paths.items():
        merged = merge(merged, path_patch(merged, key, value, value.key_pos or value.pos))
    return merged


def path_patch(root: Node, path: str, value: Node, pos: Pos) -> Node:
    """The nested patch that sets ``path`` (dotted: mapping keys and, in lists of named items, item names) to
    ``value``, shaped after ``root`` (the spec it will be merged over). A null value deletes the key or item."""
    if not PATH_KEY.fullmatch(path):
        raise SpecError(
            f"{excerpt(path)} is not a path into the spec",
            pos=pos,
            hint="dotted keys and item names: `stages.stage4.blocks.blocks.depth`",
        )
    parts = path.split(".")
    return _patch_at(root, parts, 0, value, pos, path)


def _patch_at(node: Node | None, parts: list[str], i: int, value: Node, pos: Pos, path: str) -> Node:
    if i == len(parts):
        return value
    part, shown = parts[i], f"`{'.'.join(parts[:i])}`" if i else "the spec"
    if node is not None and node.is_list:
        items = [*node.value, *(item for patch in node.meta.get(PATCHES, ()) for item in patch.value)]
        if not _named(items):
            raise SpecError(
                f"{shown} is a list of unnamed items: `{path}` cannot name one",
                pos=pos,
                hint=f"set the whole list ({shown}: [...])",
            )
        guide = next((it for it in items if it.value["name"].value == part), None)
        templates = [it for it in items if "${" in str(it.value["name"].value)]
        guide = guide or (templates[0] if templates else None)
        if guide is None:
            raise SpecError(
                f"{shown} has no item named {excerpt(part)}",
                pos=pos,
                hint=_names_hint(part, [it.value["name"].value for it in items]),
            )
        inner = _patch_at(guide, parts, i + 1, value, pos, path)
        if inner.value is None:
            body: dict[Any, Node] = {DELETE: Node(True, pos)}
        elif not inner.is_map:
            raise SpecError(f"an item of {shown} is a mapping: set its keys (`{path}.KEY`) or null", pos=pos)
        else:
            body = dict(inner.value)
        item = Node({"name": Node(part, pos), **body}, pos, meta={EXISTING: True})
        return Node([item], pos, pos)
    if node is not None and not node.is_map:
        raise SpecError(f"{shown} is {excerpt(node.value)}, not a mapping: `{path}` cannot reach into it", pos=pos)
    child = node.get(part) if node is not None else None
    return Node({part: _patch_at(child, parts, i + 1, value, pos, path)}, pos, pos)
