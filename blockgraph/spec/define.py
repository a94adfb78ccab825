"""Blocks defined in a spec: ``define:``, named and parameterized sub-graphs used like any op.

A definition lists its parameters (with defaults; ``null``: required), its inputs, its blocks (wired with
``from:`` as anywhere else, the first reading the inputs) and its output::

    define:
      convnext_block:
        params: {dim: null, mlp_ratio: 4, drop_path: 0.0}
        blocks:
          - {name: conv_dw, op: conv2d, dim_out: "${dim}", kernel: 7, groups: "${dim}"}
          - ...
          - {name: out, op: add, from: [x, drop_path]}

A use (``{name: blocks, op: convnext_block, dim: 96, depth: 3}``) is expanded in place into a composite block
(``op: block``, see :class:`blockgraph.spec.schema.CompositeBase`): the definition's blocks evaluated with the use's
parameters, their positions those of the definition with the use site in their trail. Definitions see their
parameters only (not the spec's variables), so a library of them means the same in every spec that reads it, by
``extends:`` or by ``imports: [blocks.yaml]``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from blockgraph.errors import Pos, SpecError, excerpt
from blockgraph.spec.load import Node

COMPOSITE_OP = "block"
"""The op of an expanded use of a definition (a spec may also write one inline)."""
KEYS = ("description", "params", "inputs", "blocks", "output", "outputs")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Definition:
    """One entry of ``define:``, as written (its blocks are evaluated at each use)."""

    name: str
    node: Node
    params: dict[str, Node]
    """Parameter → its default (a Node whose value is None: required)."""
    inputs: tuple[str, ...]
    blocks: Node
    output: Node | None
    outputs: Node | None

    @property
    def pos(self) -> Pos:
        return self.node.key_pos or self.node.pos


def definitions(node: Node | None) -> dict[str, Definition]:
    """The definitions of a ``define:`` mapping, checked for form (not for content: that is checked at each use).

    Raises:
        SpecError: ``define:`` is not a mapping of names to definitions, or a definition has an unknown key, no
            blocks, or a parameter or input that is not a name.
    """
    if node is None:
        return {}
    if not node.is_map:
        raise SpecError(
            "`define:` takes a mapping of block names to definitions",
            pos=node.pos,
            hint="e.g. `define: {my_block: {params: {dim: null}, blocks: [...]}}`",
        )
    out = {}
    for name, body in node.value.items():
        where = body.key_pos or body.pos
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SpecError(
                f"defined block name {excerpt(name)} is not a snake_case name",
                pos=where,
                hint="use lowercase letters, digits and '_', starting with a letter (it is used as `op: NAME`)",
            )
        if name == COMPOSITE_OP:
            raise SpecError(f"'{COMPOSITE_OP}' is reserved for inline blocks", pos=where, hint="choose another name")
        if not body.is_map:
            raise SpecError(f"the definition of '{name}' must be a mapping", pos=body.pos, hint=_EXAMPLE)
        for key, value in body.value.items():
            if key not in KEYS:
                close = difflib.get_close_matches(str(key), KEYS, n=1)
                raise SpecError(
                    f"unknown key {excerpt(key)} in the definition of '{name}'",
                    pos=value.key_pos or value.pos,
                    hint=f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(KEYS)}",
                )
        blocks = body.get("blocks")
        if blocks is None or not blocks.is_list or not blocks.value:
            raise SpecError(f"the definition of '{name}' has no blocks", pos=(blocks or body).pos, hint=_EXAMPLE)
        params = body.get("params")
        if params is not None and not params.is_map:
            raise SpecError(
                f"`params:` of '{name}' takes a mapping of names to defaults (null: required)",
                pos=params.pos,
                hint="e.g. `params: {dim: null, mlp_ratio: 4}`",
            )
        for key, value in (params.value if params is not None else {}).items():
            _check_name(key, value.key_pos or value.pos, f"parameter of '{name}'")
        inputs = body.get("inputs")
        if inputs is None:
            names: tuple[str, ...] = ("x",)
        elif inputs.is_list and inputs.value:
            names = tuple(item.value for item in inputs.value)
            for item in inputs.value:
                _check_name(item.value, item.pos, f"input of '{name}'")
        else:
            raise SpecError(f"`inputs:` of '{name}' takes a list of names", pos=inputs.pos, hint="e.g. `inputs: [x]`")
        if body.get("output") is not None and body.get("outputs") is not None:
            raise SpecError(
                f"the definition of '{name}' has both `output:` and `outputs:`",
                pos=body.value["outputs"].key_pos or body.pos,
                hint="`output: NODE` for one output, `outputs: {PORT: NODE, ...}` for several",
            )
        out[name] = Definition(
            name,
            body,
            dict(params.value) if params is not None else {},
            names,
            blocks,
            body.get("output"),
            body.get("outputs"),
        )
    return out


def _check_name(value: Any, pos: Pos, what: str) -> None:
    if not isinstance(value, str) or not value.isidentifier():
        raise SpecError(f"{what} {excerpt(value)} is not a name", pos=pos, hint="use letters, digits and '_'")


_EXAMPLE = "e.g. `my_block: {params: {dim: null}, blocks: [{name: fc, op: linear, dim_out: '${dim}'}]}`"


def bind(definition: Definition, given: dict[str, Any], use: Node) -> dict[str, Node]:
    """The parameters of one use: the values it gives (already evaluated), over the defaults.

    Raises:
        SpecError: a parameter the definition does not have, or a required one not given.
    """
    out = dict(definition.params)
    for key, value in given.items():
        if key not in definition.params:
            known = list(definition.params)
            close = difflib.get_close_matches(str(key), known, n=1)
            where = use.get(key)
            raise SpecError(
                f"block '{definition.name}' has no parameter '{key}'",
                pos=(where.key_pos or where.pos) if where is not None else use.pos,
                hint=(f"did you mean '{close[0]}'? " if close else "")
                + (f"its parameters: {', '.join(known)}" if known else "it takes no parameters")
                + f" (defined at {definition.pos})",
            )
        where = use.get(key)
        out[key] = Node.from_plain(value, where.pos if where is not None else use.pos)
    missing = [k for k, v in out.items() if v.value is None and k not in given]
    if missing:
        raise SpecError(
            f"block '{definition.name}' needs parameter{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
            pos=use.pos,
            hint=f"add {', '.join(f'`{k}: ...`' for k in missing)} (defined at {definition.pos})",
        )
    return out
