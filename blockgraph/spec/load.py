"""Load YAML into a tree of :class:`Node` values that remember where they were written.

Only PyYAML's safe composer is used (no object construction from tags): every non-standard tag is rejected,
duplicate keys are rejected (PyYAML itself silently keeps the last one), aliases are expanded with a bound on the
total size (a "billion laughs" file fails fast), and input must be UTF-8 text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from blockgraph.errors import Pos, SpecError

MAX_NODES = 200_000
"""Upper bound on the number of values in one loaded file, aliases expanded."""
MAX_BYTES = 4_000_000
"""Upper bound on the size of one spec file."""

_SCALAR_TAGS = {f"tag:yaml.org,2002:{kind}" for kind in ("str", "int", "float", "bool", "null")}
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass
class Node:
    """A value of the spec tree with its source position.

    ``value`` is a ``dict`` (keys are plain scalars, values are Nodes), a ``list`` of Nodes, or a plain scalar.
    ``key_pos`` is where this value's key was written in its parent mapping (None for list items and the root).
    """

    value: Any
    pos: Pos
    key_pos: Pos | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_map(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def is_list(self) -> bool:
        return isinstance(self.value, list)

    def get(self, key: Any) -> Node | None:
        return self.value.get(key) if self.is_map else None

    @classmethod
    def from_plain(cls, value: Any, pos: Pos) -> Node:
        """Wrap plain data (from Python, not from a file) so every value carries ``pos``."""
        if isinstance(value, dict):
            return cls({k: cls.from_plain(v, pos) for k, v in value.items()}, pos)
        if isinstance(value, list | tuple):
            return cls([cls.from_plain(v, pos) for v in value], pos)
        return cls(value, pos)

    def plain(self) -> Any:
        """The value with every Node unwrapped (positions dropped)."""
        if self.is_map:
            return {k: v.plain() for k, v in self.value.items()}
        if self.is_list:
            return [v.plain() for v in self.value]
        return self.value


def _pos(mark: yaml.Mark | None, file: str) -> Pos:
    if mark is None:
        return Pos(file)
    return Pos(file, mark.line + 1, mark.column + 1)


class _Builder:
    def __init__(self, file: str):
        self.file = file
        self.scalar = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, key_pos: Pos | None = None, depth: int = 0) -> Node:
        """The :class:`Node` tree of ``node`` (:func:`_check_size` has bounded its size, aliases expanded)."""
        pos = _pos(node.start_mark, self.file)
        if depth > 200:
            raise SpecError("the spec nests more than 200 levels deep", pos=pos)
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in _SCALAR_TAGS:
                raise self._bad_tag(node, pos)
            try:
                value = self.scalar.construct_object(node, deep=True)
            except Exception as e:  # noqa: BLE001 - PyYAML's scalar constructors raise many types (`!!int x`, `!!float`)
                tag = node.tag.rsplit(":", 1)[-1]
                raise SpecError(
                    f"cannot read {node.value!r} as {tag}",
                    pos=pos,
                    hint=f"remove the `!!{tag}` tag, or write a valid {tag}",
                ) from e
            return Node(value, pos, key_pos, {"quoted": node.style in ("'", '"')})
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                raise self._bad_tag(node, pos)
            return Node([self.build(item, None, depth + 1) for item in node.value], pos, key_pos)
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP_TAG:
                raise self._bad_tag(node, pos)
            return Node(self._mapping(node, depth), pos, key_pos)
        raise SpecError(f"unsupported YAML node {type(node).__name__}", pos=pos)  # pragma: no cover

    def _mapping(self, node: yaml.MappingNode, depth: int) -> dict[Any, Node]:
        out: dict[Any, Node] = {}
        merged: dict[Any, Node] = {}
        for key_node, value_node in node.value:
            key_pos = _pos(key_node.start_mark, self.file)
            if key_node.tag == _MERGE_TAG:  # `<<: *base` or `<<: [*a, *b]`: earlier sources win, own keys win
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in sources:
                    built = self.build(source, key_pos, depth + 1)
                    if not built.is_map:
                        raise SpecError("'<<' (merge key) needs a mapping or a list of mappings", pos=built.pos)
                    for k, v in built.value.items():
                        merged.setdefault(k, v)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError("mapping keys must be plain scalars (a name or a number)", pos=key_pos)
            key = self.build(key_node, None, depth + 1).value
            if isinstance(key, float) or key is None:
                raise SpecError(f"mapping key {key_node.value!r} must be a name or an integer", pos=key_pos)
            if key in out:
                raise SpecError(
                    f"duplicate key '{key}'",
                    pos=key_pos,
                    hint=f"'{key}' is already set at line {out[key].key_pos.line}; YAML would silently keep only the "
                    "last one, so blockgraph refuses both",
                )
            out[key] = self.build(value_node, key_pos, depth + 1)
        for k, v in merged.items():
            out.setdefault(k, v)
        return out

    def _bad_tag(self, node: yaml.Node, pos: Pos) -> SpecError:
        return SpecError(
            f"YAML tag '{node.tag}' is not allowed",
            pos=pos,
            hint="specs are plain data: no tags (python objects, binary, sets, timestamps) are accepted",
        )


def _check_size(root: yaml.Node, file: str) -> None:
    """Fail fast when expanding aliases would produce more than MAX_NODES values (counted on the composed graph,
    where an alias is a shared node, in time linear in the file)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        total = 1 + sum(sizes.get(id(c), 1) for c in children)
        sizes[id(node)] = total
        if total > MAX_NODES:
            raise SpecError(
                f"the spec expands to more than {MAX_NODES:,} values",
                pos=_pos(node.start_mark, file),
                hint="aliases (*name) are expanded on load: a file that nests aliases of aliases grows exponentially",
            )


def _line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _decode(data: bytes, file: str) -> str:
    if b"\x00" in data[:8192]:
        index = data.index(b"\x00")
        line = data.count(b"\n", 0, index) + 1
        column = index - (data.rfind(b"\n", 0, index) + 1) + 1
        raise SpecError(
            "this is a binary file, not a YAML spec",
            pos=Pos(file, line, column),
            hint="it holds a NUL byte here; a spec is UTF-8 text",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SpecError(
            f"the spec is not valid UTF-8 (byte 0x{data[e.start]:02x})",
            pos=Pos(file, line, e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1),
            hint="save the file as UTF-8",
        ) from e


_FAST_LOADER = getattr(yaml, "CSafeLoader", None)
_FAST_MAX_INDICATORS = 400


def _compose(text: str) -> list[yaml.Node]:
    """The YAML documents of ``text`` as node graphs: through libyaml (12x faster) when the text is surely shallow,
    else (and to word any error) through PyYAML's pure-Python composer.

    libyaml's composer recurses in C, so a deeply nested document overflows the C stack (a segfault at ~30,000
    levels on an 8 MiB stack, ~2,000 in a 256 KiB thread) where the Python one raises. Every collection node is
    opened by a character of its own among ``[ { - ? :`` (a flow bracket, a sequence dash, a key's colon), so
    fewer than 400 of them bound the depth below 400: the reference specs have at most 273.
    """
    if _FAST_LOADER is not None and sum(text.count(c) for c in "[{-?:") < _FAST_MAX_INDICATORS:
        try:
            return list(yaml.compose_all(text, Loader=_FAST_LOADER))
        except yaml.YAMLError:
            pass  # the pure-Python composer below says what is wrong, with its positions and words
    return list(yaml.compose_all(text, Loader=yaml.SafeLoader))


def load_text(text: str, file: str = "<string>") -> Node:
    """Parse YAML text into a positioned :class:`Node` tree (an empty document is an error)."""
    if len(text) > MAX_BYTES:
        raise SpecError(f"the spec is larger than {MAX_BYTES:,} characters", pos=Pos(file))
    try:
        nodes = _compose(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or "invalid YAML"
        context = f" ({e.context})" if e.context else ""
        raise SpecError(
            f"YAML syntax: {problem}{context}",
            pos=_pos(mark, file),
            hint="check indentation and quoting; `${...}` inside a flow mapping `{...}` must be quoted",
        ) from e
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, control characters)
        line, column = _line_col(text, e.position)
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise SpecError(
            f"unacceptable character #x{code:04x}: not allowed in YAML",
            pos=Pos(file, line, column),
            hint="remove it (control characters are not valid YAML text)",
        ) from e
    except yaml.YAMLError as e:
        raise SpecError(f"YAML syntax: {e}", pos=Pos(file)) from e
    except RecursionError:
        raise SpecError(
            "the YAML nests collections too deeply to read",
            pos=Pos(file, 1, 1),
            hint="a spec nests a few levels; look for runaway brackets or dashes",
        ) from None
    if not nodes or nodes[0] is None:
        raise SpecError("the spec is empty", pos=Pos(file, 1, 1), hint="a spec is a mapping with at least `name:`")
    if len(nodes) > 1:
        raise SpecError("the file holds several YAML documents ('---'); a spec is one document", pos=Pos(file, 1, 1))
    _check_size(nodes[0], file)
    root = _Builder(file).build(nodes[0])
    if not root.is_map:
        raise SpecError("a spec must be a mapping (`name: ...`, `stages: ...`)", pos=root.pos)
    return root


def load_file(path: str | os.PathLike[str]) -> Node:
    """Read and parse one spec file (see :func:`load_text`)."""
    file = os.fspath(path)
    try:
        size = os.path.getsize(file)
        if size > MAX_BYTES:
            raise SpecError(f"the spec is larger than {MAX_BYTES:,} bytes ({size:,})", pos=Pos(file))
        with open(file, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise SpecError(f"no such file: {file}", pos=Pos(file)) from e
    except IsADirectoryError as e:
        raise SpecError(f"{file} is a directory, not a spec file", pos=Pos(file)) from e
    except OSError as e:
        raise SpecError(f"cannot read {file}: {e.strerror}", pos=Pos(file)) from e
    return load_text(_decode(data, file), file)
