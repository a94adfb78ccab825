"""Generated documentation: the spec-language reference (from the pydantic models), the editor schema, and the
picture of coat_lite_small. ``python cli.py docs --all docs`` writes them; tests check that the checked-in files
are current.

Nothing here is written by hand per op: every op, field, type, default and description comes from the registered
params models (their docstrings and field docstrings), so a block added (or a plugin installed) is documented
without touching this file.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from blockgraph.spec import expr
from blockgraph.spec.plugins import registry
from blockgraph.spec.schema import (
    BlockName,
    BlockSpec,
    CompositeBase,
    InputSpec,
    Name,
    OutputSpec,
    Ref,
    RenameRule,
    Shared,
    TwinSpec,
    describe_fields,
    model_types,
    path_type,
)

REFRESH = "python cli.py docs --all docs"
"""The command that regenerates every generated page (``make docs`` runs it)."""
PICTURE_SPEC = "coat_lite_small"

VOCABULARY = {
    "heads": "Number of attention heads.",
    "mlp_ratio": "Hidden width of the MLP, as a multiple of its input width.",
    "qkv_bias": "Learn a bias in the query/key/value projection.",
    "drop_path": "Stochastic depth: the rate at which a residual branch is dropped per sample in training.",
    "norm_eps": "Epsilon of the block's normalization layers.",
    "bn_eps": "Epsilon of the BatchNorm layers.",
    "act": "The activation function.",
    "dim_out": "Output channels.",
    "num_classes": "Number of classes: the width of the classifier.",
    "kernel": "Convolution kernel size.",
    "stride": "Spatial downsampling factor.",
    "groups": "Convolution groups.",
}
"""What common argument names mean (the timm vocabulary every block uses), for fields that do not describe
themselves; the reference marks such descriptions."""

_COMMON = ("name", "from_")
"""Fields every block has, documented once."""


def _text(doc: str | None) -> str:
    """A docstring or description as Markdown: reST double backquotes become single ones, paragraphs kept."""
    if not doc:
        return ""
    return inspect.cleandoc(doc).replace("``", "`")


def _cell(text: str) -> str:
    """Text for one Markdown table cell (one line, pipes escaped)."""
    return " ".join(text.replace("|", "\\|").split())


def _constraints(metadata: list[Any]) -> list[str]:
    """A field's limits in words (``> 0``, ``at least 1``); a maximum length (of a name) is not worth one."""
    out = []
    for m in metadata:
        if isinstance(m, annotated_types.Gt):
            out.append(f"> {m.gt}")
        elif isinstance(m, annotated_types.Ge):
            out.append(f"≥ {m.ge}")
        elif isinstance(m, annotated_types.Lt):
            out.append(f"< {m.lt}")
        elif isinstance(m, annotated_types.Le):
            out.append(f"≤ {m.le}")
        elif isinstance(m, annotated_types.MinLen) and m.min_length > 0:
            out.append(f"at least {m.min_length}")
        elif isinstance(m, FieldInfo):
            out.extend(_constraints(m.metadata))
    return out


def _pattern(annotated: Any) -> str | None:
    for m in get_args(annotated)[1:]:
        for inner in getattr(m, "metadata", ()):
            if getattr(inner, "pattern", None):
                return inner.pattern
    return None


_NAMES = {_pattern(Name): "name", _pattern(BlockName): "block name", _pattern(Ref): "reference"}
"""Constrained strings by their pattern: what to call them."""


def _string_kind(metadata: list[Any]) -> str:
    for m in metadata:
        for item in [m, *getattr(m, "metadata", ())]:
            pattern = getattr(item, "pattern", None)
            if pattern in _NAMES:
                return _NAMES[pattern]
    return "string"


def type_text(annotation: Any, metadata: list[Any] | tuple[Any, ...] = ()) -> str:
    """A readable type: ``int > 0``, ``list of float > 0``, ```gelu`, `relu` or `silu```, ``name of a shared
    `conv_pos_enc` ``."""
    shared = next((m for m in metadata if isinstance(m, Shared)), None)
    if shared is not None:
        ops = " or ".join(f"`{op}`" for op in shared.ops)
        many = get_origin(annotation) is list
        return f"list of names of shared {ops} modules" if many else f"name of a shared {ops} module"
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        base, *extra = get_args(annotation)
        return type_text(base, [*metadata, *extra])
    limits = _constraints(list(metadata))
    suffix = (" " + " and ".join(limits)) if limits else ""
    if origin is Literal:
        values = [f"`{json.dumps(v)}`" if not isinstance(v, str) else f"`{v}`" for v in get_args(annotation)]
        return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        if all(inspect.isclass(a) and issubclass(a, BlockSpec) for a in args):
            return "block (any [op](#ops))"
        parts = [type_text(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return f"{text} or null" if type(None) in args else text
    if origin is list:
        (item,) = get_args(annotation)
        return f"list{suffix} of {type_text(item)}"
    if origin is tuple:
        items = get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:
            return f"list of {type_text(items[0])}"
        return "[" + ", ".join(type_text(i) for i in items) + "]"
    if origin is dict:
        key, value = get_args(annotation)
        return f"mapping {type_text(key)} → {type_text(value)}"
    if annotation is str:
        return _string_kind(list(metadata))
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation)) + suffix  # int > 0, float, bool, ...


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True)
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def fields(model: type[BaseModel], skip: tuple[str, ...] = ()) -> Iterator[tuple[str, str, str, str, bool]]:
    """``(key, type, default, description, from the vocabulary)`` for each field of ``model``."""
    describe_fields()
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        key = info.alias or name
        description = _text(info.description)
        common = not description and key in VOCABULARY
        if common:
            description = VOCABULARY[key]
        yield key, type_text(info.annotation, info.metadata), _default(info), description, common


def _table(rows: list[tuple[str, str, str, str, bool]]) -> list[str]:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, kind, default, description, common in rows:
        text = _cell(description) + (" ‡" if common else "") if description else "—"
        lines.append(f"| `{key}` | {_cell(kind)} | {_cell(default)} | {text} |")
    return lines


def undocumented() -> dict[str, list[str]]:
    """Op fields that have no description of their own (op → field names), whether or not the vocabulary covers
    them."""
    describe_fields()
    out: dict[str, list[str]] = {}
    for op, cls in registry().items():
        missing = [
            info.alias or name
            for name, info in cls.model_fields.items()
            if name not in (*_COMMON, "op") and not info.description
        ]
        if missing:
            out[op] = missing
    return out


def _arity(cls: type[BlockSpec]) -> str:
    arity = cls.arity
    if arity is None:
        return "any number of inputs (at least one), in `from:` order"
    return "one input" if arity == 1 else f"{arity} inputs, in `from:` order"


def _summary(cls: type[BaseModel]) -> str:
    return _text(cls.__doc__).split("\n\n")[0].replace("\n", " ")


TEMPLATES = [
    ("`extends: parent.yaml`", "Deep-merge this file over the parent (a path relative to this file, then a "
     "reference spec's name): mappings merge key by key, lists of named items (stages, paths, blocks) merge by "
     "name (below), anything else is replaced; `key: null` deletes an inherited key. A file that declares "
     "`variants:` replaces the parent's variants."),
    ("`- {name: stage4, ...}`", "In a list of named items merged over an inherited one (by `extends:`, a variant "
     "or `--set`): the item merges into the inherited item of that name, after templates expand (`stage${i + 1}` "
     "matches `stage4`); a new name is appended. Directives: `$delete: true` removes the item, `$replace: true` "
     "replaces it instead of merging, `$before: NAME` / `$after: NAME` place it; an item `- $replace: true` of "
     "its own makes the list replace the inherited one."),
    ("`stages.stage4.blocks.blocks.depth: 2`", "A dotted key (at the top level of a spec or a variant, or as "
     "`--set PATH=VALUE`): a path of mapping keys and, in lists of named items, item names; `null` deletes the "
     "key or item."),
    ("`variants: {small: {...}}`, `variant: small`", "Named variants; the chosen one (by `variant:` or the caller) "
     "is deep-merged over the spec: parent < chosen variant < this file."),
    ("`variables: {dims: [64, 128], heads: 8}`", "Values usable as `${dims[1] // heads}` anywhere below; a "
     "variable may use other variables; `--set NAME=VALUE` (or `overrides={NAME: VALUE}`) replaces one."),
    ("`${...}`", "An expression. A scalar that is exactly one `${...}` takes the expression's type (a number, a "
     "list, a mapping); otherwise the values are formatted into the text (`stage${i + 1}`)."),
    ("`- for: {i: [0, 1, 2, 3]}`", "On a list item (a stage, a path, a block, a rename rule): repeat the item once "
     "per value, with the names bound in its expressions; several names are zipped."),
    ("`- if: ${cond}`", "On a list item: keep it only when the condition is true."),
    ("`depth: N`", "On a block of a `blocks` list: repeat it N times as `name.0` ... `name.N-1`, with `rep` bound "
     "to the repetition index; its `from:` wires the first repetition, each later one reads the one before."),
]  # fmt: skip


_IMPORTS = (
    "Modules of custom blocks to import first: dotted names (`my_pkg.blocks`) or .py files relative to this file "
    "(`./blocks/convnext.py`); inherited through `extends:`. Their code runs, as a Python config's does; see "
    "[custom blocks](custom-blocks.md). A `.yaml` file is a library of blocks defined in YAML: its `define:` is read "
    "(no code runs)."
)


DEFINE_TEXT = [
    "`define:` names blocks made of other blocks: parameterized sub-graphs, used like any op. A definition has "
    "`params` (a mapping of names to defaults, `null` for a required one; a default may use the other parameters, "
    "`hidden: ${dim * 4}`), `inputs` (local names, default `[x]`), `blocks` (wired with `from:` as anywhere else, "
    "the first reading the inputs), and `output` (a block; default: the last) or `outputs` (`{port: block}`, read "
    "as `from: NAME.port`). Its expressions see its parameters only, not the spec's variables, so a library of "
    "definitions means the same in every spec that reads it.",
    "",
    "```yaml",
    "define:",
    "  convnext_block:",
    "    params: {dim: null, ls_init: 1.0e-6, drop_path: 0.0}",
    "    blocks:",
    '      - {name: conv_dw, op: conv2d, dim_out: "${dim}", kernel: 7, groups: "${dim}"}',
    "      - {name: tokens, op: rearrange, pattern: b c h w -> b (h w) c}",
    "      - {name: norm, op: norm, kind: layer, eps: 1.0e-6}",
    '      - {name: mlp, op: mlp, dim: "${dim}"}',
    "      - {name: map, op: rearrange, pattern: b (h w) c -> b c h w}",
    '      - {name: gamma, op: layer_scale, init: "${ls_init}"}',
    '      - {name: drop_path, op: drop_path, rate: "${drop_path}"}',
    "      - {name: add, op: add, from: [drop_path, x]}",
    "stages:",
    "  - name: stage0",
    "    blocks:",
    '      - {name: blocks, op: convnext_block, dim: 96, depth: 3, drop_path: "${0.1 * rep}"}',
    "```",
    "",
    "A use gives the parameters as keys beside `name` and `from`, and takes `depth:`, `for:` and `if:` like any "
    "block. Its blocks become nodes named under it (`stage0.blocks.1.mlp`), so their modules nest in the model and "
    "the state_dict (`stage0.blocks.1.mlp.fc1.weight`); its shape and parameter count are those of its parts, "
    "known statically; `summary` lists the parts and `graph` draws each use as a box (`--collapse`: one node). An "
    "error inside a definition points at its line, with the use site in its trail. Definitions may use other "
    "definitions (not themselves), and live in library files: `imports: [blocks/common.yaml]` reads the "
    "`define:` of a YAML file (and of the libraries it imports), and `extends:` inherits the parent's; the "
    "spec's own definitions win. A definition may not take the name of a registered op.",
    "",
    "Declared under `shared:` (`shared: {mixer: {op: my_block, dim: 64}}`), a defined block has one set of weights "
    "(`mixer.*` in the state_dict), applied wherever a block says `{op: use, module: mixer}`: weight tying, as a "
    "head shared by the levels of a feature pyramid. Every use must give it inputs of the same layout and channels "
    "(the sizes may differ); its parameters count once. Blocks inside a definition may also name the shared modules "
    "of the enclosing stage or model in their fields (CoaT's CPE/CRPE).",
]


def spec_language() -> str:
    """The Markdown reference of the spec language (docs/spec-language.md)."""
    model, stage = model_types()
    path = path_type()
    ops = registry()
    out = [
        "# The blockgraph spec language",
        "",
        f"<!-- Generated from the pydantic models by `{REFRESH}`; do not edit by hand. -->",
        "",
        "A spec is a YAML file. It is loaded (every value keeps its file:line:col), expanded (templates, variables "
        "and expressions below), validated against the models on this page (unknown keys are errors, with a "
        '"did you mean"), turned into a dataflow graph and checked for shapes, all without torch. Editors can '
        "complete and check specs with the JSON Schema `docs/blockgraph.schema.json` (see the README).",
        "",
        "Contents: [templates and expressions](#templates-and-expressions) · [the model](#the-model) · "
        "[stages](#stages) · [paths](#paths) · [blocks defined in a spec](#blocks-defined-in-a-spec) · "
        "[every block](#fields-of-every-block) · [ops](#ops) · "
        "[input, outputs, twin](#input-outputs-and-twin)",
        "",
        "Types: `int > 0` and the like are constraints checked on validation; a `name` is an identifier "
        "(`[A-Za-z_][A-Za-z0-9_]*`); a reference (`from:`) names a node (`stage2.to_map`), a node's output port "
        "(`patch_embed.p1`) or a model input, local names being looked up in the enclosing path and stage first. "
        "‡ marks a description taken from the common meaning of the argument name, where the op gives none of its "
        "own.",
        "",
        "## Templates and expressions",
        "",
        "| construct | meaning |",
        "| --- | --- |",
        *(f"| {_cell(k)} | {_cell(v)} |" for k, v in TEMPLATES),
        "",
        "Expressions are a small, safe subset of Python's (no `eval`): literals (numbers, strings, "
        "`true`/`false`/`null`, lists, mappings), variables, indexing and slicing (`dims[-1]`, `depths[:i]`), "
        "`+ - * / // % **`, comparisons, `in`, `and`/`or`/`not`, `a if c else b`, list comprehensions, and the "
        f"functions {', '.join(f'`{f}`' for f in expr.FUNCTIONS)}. Inside `for:` and `depth:` the loop names "
        "(`i`, `rep`) are bound.",
        "",
        "## The model",
        "",
        "The top level of a spec: its input, the stages (run in order), blocks after them (heads), shared "
        "modules, and the named outputs and feature maps.",
        "",
    ]
    variables = ("variables", "mapping name → any", "`{}`", "Values usable as `${name}` below (see the templates).")
    top = [(*variables, False) if row[0] == "variables" else row for row in fields(model)]
    extends = ("extends", "string (a path)", "—", "A parent spec to deep-merge this file over.", False)
    variants = ("variants", "mapping name → a partial model", "`{}`", "Named variants (see the templates).", False)
    imports = ("imports", "list of module names, .py or .yaml files", "`[]`", _IMPORTS, False)
    define = ("define", "mapping name → a definition", "`{}`", "Blocks defined in YAML (see below).", False)
    out += _table([*top, extends, imports, define, variants])
    out += ["", "## Stages", "", _text(inspect.getdoc(stage)), "", *_table(list(fields(stage))), ""]
    out += ["## Paths", "", _text(inspect.getdoc(path)), "", *_table(list(fields(path))), ""]
    out += ["## Blocks defined in a spec", "", *DEFINE_TEXT, ""]
    out += ["### Inline blocks (`op: block`)", "", _text(inspect.getdoc(CompositeBase)), ""]
    out += [*_table(list(fields(CompositeBase, skip=("op", *_COMMON)))), ""]
    out += [
        "## Fields of every block",
        "",
        "Every block, in a `blocks` list, as a `merge` or as a shared module, names its `op` and may give:",
        "",
        *_table(list(fields(BlockSpec, skip=("op",)))),
        "",
        "A field whose type is a *name of a shared module* refers, by name, to a module declared under `shared:` "
        "(of the path, the stage, or the model, looked up in that order); one set of weights serves every block "
        "that names it, and every user must agree with its dims.",
        "",
        "## Ops",
        "",
        "| op | what it is |",
        "| --- | --- |",
        *(f"| [`{op}`](#{op}) | {_cell(_summary(cls))} |" for op, cls in ops.items()),
        "",
    ]
    for op, cls in ops.items():
        out += [f"### `{op}`", "", _text(cls.__doc__), ""]
        shared = cls.shared_fields()
        facts = [f"Inputs: {_arity(cls)}."]
        if shared:
            uses = ", ".join(f"`{f}` ({' or '.join(f'`{o}`' for o in m.ops)})" for f, m in shared.items())
            facts.append(f"Shared modules: {uses}.")
        if cls.__module__.split(".")[0] != "blockgraph":
            facts.append(f"Registered by `{cls.__module__}`.")
        out += [" ".join(facts), ""]
        rows = list(fields(cls, skip=("op", *_COMMON)))
        out += _table(rows) if rows else ["No parameters besides `name` and `from`."]
        out.append("")
    out += ["## Input, outputs and twin", ""]
    for model_cls in (InputSpec, OutputSpec, TwinSpec, RenameRule):
        out += [f"### {model_cls.__name__}", "", _text(model_cls.__doc__), ""]
        out += [*_table(list(fields(model_cls))), ""]
    return "\n".join(out).rstrip() + "\n"


def picture_page() -> str:
    """docs/coat_lite_small.md: the Mermaid picture of coat_lite_small, as ``blockgraph graph`` draws it."""
    from blockgraph.api import analyze, spec_path
    from blockgraph.graph.render import picture, to_mermaid

    path = spec_path(PICTURE_SPEC)
    analysis = analyze(path)
    h, w = analysis.spec.input.size
    graph = to_mermaid(picture(analysis.inference))
    return (
        f"# {PICTURE_SPEC}, drawn by blockgraph\n\n"
        f"<!-- Generated by `{REFRESH}`; do not edit by hand. -->\n\n"
        f"`python cli.py graph specs/{path.name}` (Mermaid, which GitHub renders; `--format dot|svg|png` for "
        "Graphviz, `--collapse` to draw each repeated block once). Each stage is a box; hexagons are the shared "
        "modules, drawn once, with a dashed edge to every block that uses them; rounded ends are the model's "
        f"outputs and feature maps. Shapes are for one {analysis.spec.input.channels}x{h}x{w} image.\n\n"
        f"```mermaid\n{graph}```\n"
    )


def pages() -> dict[str, str]:
    """Every generated page, by file name under docs/."""
    from blockgraph.spec.source_schema import source_schema

    return {
        "spec-language.md": spec_language(),
        "blockgraph.schema.json": json.dumps(source_schema(), indent=2, ensure_ascii=False) + "\n",
        f"{PICTURE_SPEC}.md": picture_page(),
    }
