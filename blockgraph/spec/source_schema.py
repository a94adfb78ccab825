"""The JSON Schema of spec files *as written*, for editors (``# yaml-language-server: $schema=...``).

:func:`json_schema` describes a spec after expansion. A file as written has more: the top-level keys
``extends``, ``imports``, ``variant``, ``variants`` and ``variables``; ``for:`` and ``if:`` on list items and
``depth:`` on blocks; ``${...}`` expressions wherever a value goes (a number, a list, a name such as
``stage${i + 1}``); and ``key: null``, which deletes an inherited key. :func:`source_schema` derives that schema
from the expanded one, so every op and every field (with its description and default) is offered for completion,
while the keys and ops that do not exist are still flagged.

It is JSON Schema draft-07 (what YAML editors support best): ``definitions``, and ``items`` lists for tuples.
"""

from __future__ import annotations

import copy
from typing import Any

from blockgraph.spec.plugins import load_plugins
from blockgraph.spec.schema import describe_fields, model_types

DRAFT = "http://json-schema.org/draft-07/schema#"
EXPRESSION = {"$ref": "#/definitions/Expression"}
EXPRESSION_PATTERN = r"\$\{"
_META = ("title", "description", "default")
_TEMPLATE_KEYS = {
    "for": {
        "description": "Repeat this list item once per value, with the names bound in its expressions: "
        "`for: {i: [0, 1, 2, 3]}` (several names are zipped).",
        "type": "object",
        "minProperties": 1,
        "additionalProperties": {"anyOf": [{"type": "array"}, EXPRESSION]},
    },
    "if": {
        "description": "Keep this list item only when the condition is true: `if: ${depths[i] > 0}`.",
        "anyOf": [{"type": "boolean"}, EXPRESSION],
    },
}
_DIRECTIVES = {
    "$delete": {"description": "Remove the inherited item of this name (patching a list by name).", "const": True},
    "$replace": {
        "description": "Replace the inherited item of this name instead of merging into it; as an item of its own "
        "(`- $replace: true`), make the whole list replace the inherited one.",
        "const": True,
    },
    "$before": {"description": "Put this item before the item of this name.", "type": "string"},
    "$after": {"description": "Put this item after the item of this name.", "type": "string"},
}
_PATCH = {
    "description": "A patch of the inherited item of this name (in a spec that extends another, or a variant): its "
    "keys merge into that item's.",
    "type": "object",
    "properties": {"name": {"type": "string"}, **_DIRECTIVES},
    "required": ["name"],
    "not": {"required": ["op"]},
}
_REPLACE_ALL = {
    "description": "`- $replace: true`: this list replaces the inherited one (instead of merging into it by name).",
    "type": "object",
    "properties": {"$replace": {"const": True}},
    "required": ["$replace"],
    "additionalProperties": False,
}
_PATH_KEYS = {
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+$": {
        "description": "A dotted path into the spec (mapping keys and, in lists of named items, item names): "
        "`stages.stage4.blocks.blocks.depth: 2`."
    }
}
_DEPTH = {
    "description": "Repeat this block N times as `name.0` ... `name.N-1` (`${rep}` is the repetition index); "
    "`from:` wires the first, each next one reads the one before.",
    "anyOf": [{"type": "integer", "minimum": 0}, EXPRESSION],
}
_TOP_LEVEL = {
    "extends": {
        "description": "A parent spec file (relative to this one) that this file is deep-merged over; "
        "`key: null` deletes an inherited key.",
        "type": "string",
    },
    "variables": {
        "description": "Values usable as `${name}` anywhere below (a variable may use other variables).",
        "type": "object",
    },
    "imports": {
        "description": "Modules of custom blocks to import (their code runs): dotted module names (`my_pkg.blocks`) "
        "or .py files relative to this file (`./blocks/convnext.py`); inherited through `extends:`. A .yaml file is a "
        "library of blocks defined in YAML (its `define:` is read).",
        "type": "array",
        "items": {"type": "string"},
    },
    "define": {
        "description": "Blocks defined in YAML: named, parameterized sub-graphs of ops, used like any op "
        "(`op: NAME`, with their parameters as keys).",
        "type": "object",
        "additionalProperties": {"$ref": "#/definitions/Definition"},
    },
}
_DEFINITION = {
    "description": "A block defined in YAML: its parameters, inputs, blocks and output.",
    "type": "object",
    "properties": {
        "description": {"description": "What the block is, for people.", "type": "string"},
        "params": {
            "description": "Parameters and their defaults (null: required), usable as `${name}` in the blocks.",
            "type": "object",
        },
        "inputs": {
            "description": "The local names of the inputs (default: [x]).",
            "type": "array",
            "items": {"type": "string"},
        },
        "blocks": {"description": "The blocks of the sub-graph; the first reads the inputs.", "type": "array"},
        "output": {"description": "The block whose value is the output (default: the last).", "type": "string"},
        "outputs": {"description": "Several named outputs: `{port: block}`.", "type": "object"},
    },
    "required": ["blocks"],
    "additionalProperties": False,
}
_USE = {
    "description": "A use of a block defined under `define:` (its parameters are checked when the spec is expanded).",
    "type": "object",
    "properties": {"op": {"type": "string"}},
    "required": ["op"],
}


def _wrap(schema: dict[str, Any], *, null: bool) -> dict[str, Any]:
    """``schema``, or an expression (or, with ``null``, null: deleting an inherited key).

    The alternatives go into the value's own schema wherever possible, so that an editor (and jsonschema) reports
    an error at the value itself rather than "not valid under any of the given schemas" one level up: a ``type``
    list plus a ``pattern`` (which applies to strings only). Object definitions accept expressions and null
    themselves (see :func:`source_schema`), so a ``$ref`` or a union of them needs nothing more. Only an ``enum``
    or a ``const`` becomes an ``anyOf``.
    """
    meta = {k: schema[k] for k in _META if k in schema}
    inner = {k: v for k, v in schema.items() if k not in _META}
    kind = inner.get("type")
    if "$ref" in inner or "oneOf" in inner:
        return {**meta, **inner}
    if "anyOf" in inner and set(inner) <= {"anyOf", "discriminator"}:
        members = [m for m in inner["anyOf"] if m != {"type": "null"}]
        if len(members) == 1 and "discriminator" not in inner:  # Optional[X]: X or null
            return _wrap({**meta, **members[0]}, null=null)
        if all("$ref" in m or "oneOf" in m for m in members):
            return {**meta, **inner, "anyOf": members} if len(members) > 1 else {**meta, **members[0]}
        return {**meta, **inner, "anyOf": [*members, EXPRESSION, *([{"type": "null"}] if null else [])]}
    if isinstance(kind, str) and not {"enum", "const", "allOf"} & set(inner):
        if kind == "string":
            if "pattern" in inner:
                inner["pattern"] = f"(?:{inner['pattern']})|" + EXPRESSION_PATTERN
            inner.pop("maxLength", None)  # an expression may be longer than the value it makes
        else:
            inner["pattern"] = EXPRESSION_PATTERN  # applies to strings only
        inner["type"] = [kind, *(["string"] if kind != "string" else []), *(["null"] if null else [])]
        return {**meta, **inner}
    return {**meta, "anyOf": [inner, EXPRESSION, *([{"type": "null"}] if null else [])]}


def _convert(schema: Any) -> Any:
    """Rewrite one schema (recursively): draft-07 spellings, expressions in every value position."""
    if isinstance(schema, list):
        return [_convert(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str):
            out[key] = value.replace("#/$defs/", "#/definitions/")
        elif key in ("properties", "patternProperties"):
            out[key] = {
                name: _convert(s) if key == "properties" and name == "op" else _wrap(_convert(s), null=True)
                for name, s in value.items()
            }
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = _wrap(_convert(value), null=True)
        elif key == "items" and isinstance(value, dict):
            out[key] = _wrap(_convert(value), null=False)
        elif key == "prefixItems":
            out["items"] = [_wrap(_convert(s), null=False) for s in value]
            out["additionalItems"] = False
        elif key == "oneOf":  # the union of blocks: each member accepts expressions, so "any" (op tells them apart)
            out["anyOf"] = _convert(value)
        elif key == "discriminator":
            out[key] = {
                "propertyName": value["propertyName"],
                "mapping": {op: ref.replace("#/$defs/", "#/definitions/") for op, ref in value["mapping"].items()},
            }
        elif key in ("default", "const", "enum", "examples"):
            out[key] = copy.deepcopy(value)  # data, not schemas
        else:
            out[key] = _convert(value)
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the spec language as written *after* expansion (installed plugins included)."""
    load_plugins()
    describe_fields()
    model, _ = model_types()
    schema = model.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "blockgraph model spec"
    return schema


def source_schema() -> dict[str, Any]:
    """The JSON Schema (draft-07) of spec files as written: every registered op (plugins included) and field, plus
    the template language (extends, variants, variables, for, if, depth, ``${...}``)."""
    expanded = json_schema()
    defs = expanded.pop("$defs")
    blocks = {
        ref.rsplit("/", 1)[1]
        for schema in _walk(expanded, defs)
        if isinstance(schema, dict) and isinstance(schema.get("discriminator"), dict)
        for ref in schema["discriminator"]["mapping"].values()
    }
    definitions = {name: _convert(schema) for name, schema in defs.items()}
    for schema in definitions.values():  # an object may be written as an expression, or deleted (null)
        if schema.get("type") == "object":
            schema["type"] = ["object", "string", "null"]
            schema["pattern"] = EXPRESSION_PATTERN
    for name in blocks:
        definitions[name]["properties"]["depth"] = copy.deepcopy(_DEPTH)
    for name in (*blocks, "StageSpec", "PathSpec", "RenameRule"):
        definitions[name]["properties"].update(copy.deepcopy(_TEMPLATE_KEYS))
    for name in (*blocks, "StageSpec", "PathSpec"):  # patching inherited lists by name
        definitions[name]["properties"].update(copy.deepcopy(_DIRECTIVES))
    for name in ("StageSpec", "PathSpec"):  # `- $replace: true` is the one item without a name
        definitions[name]["required"].remove("name")
        definitions[name].update({"if": {"not": {"required": ["$replace"]}}, "then": {"required": ["name"]}})
    definitions["Expression"] = {
        "description": "An expression: `${dims[i] // 2}` stands for a value of any type; `${...}` inside text "
        "(`stage${i + 1}`) is formatted into it.",
        "type": "string",
        "pattern": EXPRESSION_PATTERN,
    }
    root = _convert({k: v for k, v in expanded.items() if k not in ("$schema", "title", "required")})
    unions = [d for d in _walk(root, definitions) if isinstance(d, dict) and isinstance(d.get("discriminator"), dict)]
    ops = sorted({op for union in unions for op in union["discriminator"]["mapping"]})
    for union in unions:  # any other op may name a defined block; an item may patch an inherited one
        union["anyOf"].extend({"$ref": f"#/definitions/{name}"} for name in ("DefinedBlockUse", "Patch", "ReplaceList"))
    definitions["Patch"] = copy.deepcopy(_PATCH)
    definitions["ReplaceList"] = copy.deepcopy(_REPLACE_ALL)
    definitions["DefinedBlockUse"] = {**copy.deepcopy(_USE), "not": {"properties": {"op": {"enum": ops}}}}
    definitions["Definition"] = copy.deepcopy(_DEFINITION)
    definitions["Definition"]["properties"]["blocks"]["items"] = copy.deepcopy(unions[0]) if unions else {}
    root["properties"].update({k: copy.deepcopy(v) for k, v in _TOP_LEVEL.items()})
    root["patternProperties"] = copy.deepcopy(_PATH_KEYS)
    variant = copy.deepcopy(root)
    variant["description"] = "A variant: deep-merged over the spec when chosen (`variant: small`)."
    variant.pop("title", None)
    for key in ("extends", "variant"):
        variant["properties"].pop(key)
    definitions["Variant"] = variant
    root["properties"]["variants"] = {
        "description": "Named variants (`tiny: {...}`, `small: {...}`), one of which `variant:` (or the caller) "
        "chooses.",
        "type": "object",
        "additionalProperties": {"$ref": "#/definitions/Variant"},
    }
    return {
        "$schema": DRAFT,
        "title": "blockgraph model spec",
        "description": "A blockgraph spec file as written (extends, imports, variants, variables, for/if, depth and "
        "${...} expressions included). Generated by `blockgraph schema`; the spec language is described in "
        "docs/spec-language.md.",
        **root,
        "definitions": dict(sorted(definitions.items())),
    }


def _walk(schema: Any, defs: dict[str, Any]) -> list[Any]:
    """Every sub-schema reachable from ``schema`` and the definitions (each visited once)."""
    out, stack = [], [schema, *defs.values()]
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out
