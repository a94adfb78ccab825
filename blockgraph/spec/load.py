"""Load YAML into a tree of :class:`Node` values that remember where they were written.

Only PyYAML's safe resolver is used (no object construction from tags): every non-standard tag is rejected,
duplicate keys are rejected (PyYAML itself silently keeps the last one), and input must be UTF-8 text. Every read
is bounded, whatever the input: only regular files are read, at most MAX_BYTES of them; the document is composed
without recursion under limits checked as it grows (MAX_NODES values and MAX_DEPTH levels, aliases expanded; no
alias inside the collection it names), so a "billion laughs" file, a recursive alias or megabytes of tiny items
fail in time linear in what was read before the limit.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

import yaml

from blockgraph.errors import Pos, SpecError, excerpt, shorten

MAX_NODES = 200_000
"""Upper bound on the number of values in one loaded file, aliases expanded."""
MAX_BYTES = 4_000_000
"""Upper bound on the size of one spec file."""
MAX_DEPTH = 200
"""Upper bound on the nesting of collections in one loaded file, aliases expanded."""

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

    def build(self, node: yaml.Node, key_pos: Pos | None = None) -> Node:
        """The :class:`Node` tree of ``node`` (:class:`_Composer` has bounded its size and depth, aliases
        expanded)."""
        pos = _pos(node.start_mark, self.file)
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in _SCALAR_TAGS:
                raise self._bad_tag(node, pos)
            try:
                value = self.scalar.construct_object(node, deep=True)
            except Exception as e:  # noqa: BLE001 - PyYAML's scalar constructors raise many types (`!!int x`, `!!float`)
                tag = node.tag.rsplit(":", 1)[-1]
                raise SpecError(
                    f"cannot read {excerpt(node.value)} as {tag}",
                    pos=pos,
                    hint=f"remove the `!!{tag}` tag, or write a valid {tag}",
                ) from e
            return Node(value, pos, key_pos, {"quoted": node.style in ("'", '"')})
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                raise self._bad_tag(node, pos)
            return Node([self.build(item) for item in node.value], pos, key_pos)
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP_TAG:
                raise self._bad_tag(node, pos)
            return Node(self._mapping(node), pos, key_pos)
        raise SpecError(f"unsupported YAML node {type(node).__name__}", pos=pos)  # pragma: no cover

    def _mapping(self, node: yaml.MappingNode) -> dict[Any, Node]:
        out: dict[Any, Node] = {}
        merged: dict[Any, Node] = {}
        for key_node, value_node in node.value:
            key_pos = _pos(key_node.start_mark, self.file)
            if key_node.tag == _MERGE_TAG:  # `<<: *base` or `<<: [*a, *b]`: earlier sources win, own keys win
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in sources:
                    built = self.build(source, key_pos)
                    if not built.is_map:
                        raise SpecError("'<<' (merge key) needs a mapping or a list of mappings", pos=built.pos)
                    for k, v in built.value.items():
                        merged.setdefault(k, v)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError("mapping keys must be plain scalars (a name or a number)", pos=key_pos)
            key = self.build(key_node).value
            if isinstance(key, float) or key is None:
                raise SpecError(f"mapping key {excerpt(key_node.value)} must be a name or an integer", pos=key_pos)
            if key in out:
                raise SpecError(
                    f"duplicate key '{key}'",
                    pos=key_pos,
                    hint=f"'{key}' is already set at line {out[key].key_pos.line}; YAML would silently keep only the "
                    "last one, so blockgraph refuses both",
                )
            out[key] = self.build(value_node, key_pos)
        for k, v in merged.items():
            out.setdefault(k, v)
        return out

    def _bad_tag(self, node: yaml.Node, pos: Pos) -> SpecError:
        return SpecError(
            f"YAML tag '{node.tag}' is not allowed",
            pos=pos,
            hint="specs are plain data: no tags (python objects, binary, sets, timestamps) are accepted",
        )


class _Composer:
    """The node graph of one YAML document, composed from parser events without recursion, under limits checked as
    it grows: at most MAX_NODES values with aliases expanded, at most MAX_DEPTH nested collections (aliases
    expanded too), and no alias inside the collection it names (``r: &r [*r]``, a graph with a cycle).

    Each node's expanded size and height are known when it closes, so an alias costs one lookup, and a file is
    refused after reading about MAX_NODES events, however large it is or however its aliases multiply.
    """

    def __init__(self, parser: Any, file: str):
        self.parser = parser
        self.file = file
        self.anchors: dict[str, tuple[yaml.Node, int, int]] = {}
        """Closed anchored nodes: (node, values when expanded, levels of collections when expanded)."""
        self.open: dict[str, yaml.Node] = {}
        """Anchors of the collections still open (an alias of one of them would make a cycle)."""
        self.values = 0
        self.aliased = False

    def document(self) -> yaml.Node | None:
        """The one document's root node; None for an empty stream.

        Raises:
            SpecError: over a limit, a recursive alias, or several documents.
            yaml.YAMLError: the text is not YAML.
        """
        parser = self.parser
        parser.get_event()  # stream start
        if parser.check_event(yaml.StreamEndEvent):
            return None
        parser.get_event()  # document start
        root = self._node()
        parser.get_event()  # document end
        if not parser.check_event(yaml.StreamEndEvent):
            raise SpecError(
                "the file holds several YAML documents ('---'); a spec is one document",
                pos=_pos(parser.peek_event().start_mark, self.file),
                hint="remove the second document, or the `---` line that starts it",
            )
        return root

    def _node(self) -> yaml.Node:
        parser = self.parser
        stack: list[tuple[yaml.Node, str | None, list[int]]] = []  # open collections: node, anchor, [size, height]
        while True:
            event = parser.get_event()
            if isinstance(event, yaml.AliasEvent):
                node, size, height = self._alias(event, len(stack))
            elif isinstance(event, yaml.ScalarEvent):
                tag = (
                    event.tag
                    if event.tag not in (None, "!")
                    else parser.resolve(yaml.ScalarNode, event.value, event.implicit)
                )
                node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
                size, height = self._new(event, len(stack), 0), 0
                self._anchor(event, node, size, height)
            elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                kind = yaml.SequenceNode if isinstance(event, yaml.SequenceStartEvent) else yaml.MappingNode
                tag = event.tag if event.tag not in (None, "!") else parser.resolve(kind, None, event.implicit)
                node = kind(tag, [], event.start_mark, None, flow_style=event.flow_style)
                self._new(event, len(stack), 1)
                if event.anchor is not None:
                    self.open[event.anchor] = node
                stack.append((node, event.anchor, [1, 1]))
                continue
            else:  # the end of a sequence or a mapping
                node, anchor, (size, height) = stack.pop()
                node.end_mark = event.end_mark
                if anchor is not None:
                    del self.open[anchor]
                    self._anchor(event, node, size, height, anchor)
            if not stack:
                return node
            parent, _, measure = stack[-1]
            measure[0] += size
            measure[1] = max(measure[1], height + 1)
            if isinstance(parent, yaml.SequenceNode):
                parent.value.append(node)
            elif parent.value and len(parent.value[-1]) == 1:  # the value of the pending key
                parent.value[-1] = (parent.value[-1][0], node)
            else:
                parent.value.append((node,))  # a key, waiting for its value

    def _new(self, event: yaml.Event, depth: int, levels: int) -> int:
        """Count one new value (a collection adds ``levels`` of nesting at ``depth``); returns its size, 1."""
        self._check(event, 1, depth + levels)
        return 1

    def _alias(self, event: yaml.AliasEvent, depth: int) -> tuple[yaml.Node, int, int]:
        pos = _pos(event.start_mark, self.file)
        name = event.anchor
        if name in self.open:
            raise SpecError(
                f"the alias *{shorten(name)} is inside the collection it names (&{shorten(name)}): it would "
                "expand forever",
                pos=pos,
                hint=f"the anchor is at line {self.open[name].start_mark.line + 1}; an alias can only repeat a value "
                "that is complete where the alias is written",
            )
        if name not in self.anchors:
            raise SpecError(
                f"alias *{shorten(name)} names no anchor defined before it",
                pos=pos,
                hint="define the value with `&name` before using it as `*name`",
            )
        node, size, height = self.anchors[name]
        self.aliased = True
        self._check(event, size, depth + height)
        return node, size, height

    def _anchor(self, event: yaml.Event, node: yaml.Node, size: int, height: int, name: str | None = None) -> None:
        name = name if name is not None else getattr(event, "anchor", None)
        if name is None:
            return
        if name in self.anchors:
            first = self.anchors[name][0].start_mark.line + 1
            raise SpecError(
                f"anchor &{shorten(name)} is defined twice",
                pos=_pos(node.start_mark, self.file),
                hint=f"it is first defined at line {first}; give each anchor its own name",
            )
        self.anchors[name] = (node, size, height)

    def _check(self, event: yaml.Event, values: int, levels: int) -> None:
        self.values += values
        if self.values > MAX_NODES:
            raise SpecError(
                f"the spec expands to more than {MAX_NODES:,} values",
                pos=_pos(event.start_mark, self.file),
                hint="aliases (*name) are expanded on load: a file that nests aliases of aliases grows exponentially"
                if self.aliased
                else f"a spec holds a few thousand values at most; this file holds more than {MAX_NODES:,}",
            )
        if levels > MAX_DEPTH:
            raise SpecError(
                f"the spec nests collections more than {MAX_DEPTH} levels deep",
                pos=_pos(event.start_mark, self.file),
                hint="a spec nests a few levels; look for runaway brackets or dashes"
                + (", or aliases nested in aliases" if self.aliased else ""),
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
_REWORD_BYTES = 256_000
"""libyaml's errors are reworded by PyYAML's pure-Python parser (better messages) for texts up to this size; a
larger text keeps libyaml's words, so that no failure costs the pure parser's time over megabytes."""
_NON_PRINTABLE = yaml.reader.Reader.NON_PRINTABLE


def _compose(text: str, file: str) -> yaml.Node | None:
    """The root node of the one YAML document of ``text`` (None when there is none), composed by
    :class:`_Composer` from libyaml's parser events (a state machine in C: no recursion however deep the text
    nests, and fast), or from PyYAML's pure-Python parser where libyaml is missing, or to word an error.

    Raises:
        SpecError: the text breaks a limit (:class:`_Composer`).
        yaml.YAMLError: the text is not YAML.
    """
    if _FAST_LOADER is None:
        return _compose_with(yaml.SafeLoader, text, file)
    try:
        return _compose_with(_FAST_LOADER, text, file)
    except yaml.YAMLError as fast_error:
        if bad := _NON_PRINTABLE.search(text):  # libyaml reports a bad character without saying which
            raise yaml.reader.ReaderError(
                file, bad.start(), ord(bad.group()), "unicode", "special characters are not allowed"
            ) from None
        if len(text) > _REWORD_BYTES:
            raise
        _compose_with(yaml.SafeLoader, text, file)  # raises the same error, in PyYAML's words
        raise fast_error  # (the parsers disagree: keep libyaml's)


def _compose_with(loader: type, text: str, file: str) -> yaml.Node | None:
    parser = loader(text)
    try:
        return _Composer(parser, file).document()
    finally:
        parser.dispose()


def _load(text: str, file: str) -> yaml.Node | None:
    """The composed document of ``text``, every YAML error made a :class:`SpecError` at its position."""
    if len(text) > MAX_BYTES:
        raise SpecError(f"the spec is larger than {MAX_BYTES:,} characters", pos=Pos(file))
    try:
        return _compose(text, file)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = shorten(e.problem or "invalid YAML", 120)
        context = f" ({shorten(e.context, 80)})" if e.context else ""
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
        raise SpecError(f"YAML syntax: {shorten(str(e), 120)}", pos=Pos(file)) from e


def load_text(text: str, file: str = "<string>") -> Node:
    """Parse YAML text into a positioned :class:`Node` tree (an empty document is an error).

    Raises:
        SpecError: the text is not YAML, breaks a limit (size, nesting, values with aliases expanded), or is not
            one mapping.
    """
    node = _load(text, file)
    if node is None:
        raise SpecError("the spec is empty", pos=Pos(file, 1, 1), hint="a spec is a mapping with at least `name:`")
    root = _Builder(file).build(node)
    if not root.is_map:
        kind = "a list" if root.is_list else "a single value"
        raise SpecError(
            f"a spec must be a mapping (`name: ...`, `stages: ...`); this file is {kind}",
            pos=root.pos,
            hint="is it a spec? (its content is not shown)",
        )
    return root


def load_value(text: str, file: str) -> Node:
    """Parse YAML text holding any one value (a ``--set`` value), with the limits of a spec file; empty text is
    null."""
    node = _load(text, file)
    return Node(None, Pos(file)) if node is None else _Builder(file).build(node)


def describe_kind(mode: int) -> str:
    """What a file that is not a regular file is, from its ``st_mode``: ``a directory``, ``a FIFO``, ..."""
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


MISSING = "a file that does not exist"
NUL_NAME = "a path with a NUL character (no file has one)"


def regular_file_kind(path: str | os.PathLike[str]) -> str | None:
    """None when ``path`` is a regular file (symbolic links followed), else what it is (:func:`describe_kind`,
    or :data:`MISSING`)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return MISSING
    except ValueError:  # a NUL character: no file can have such a name
        return NUL_NAME
    return None if stat.S_ISREG(mode) else describe_kind(mode)


def read_regular(file: str, limit: int = MAX_BYTES) -> bytes:
    """The bytes of ``file``, a regular file of at most ``limit`` bytes.

    A FIFO, a device (``/dev/zero``), a directory or a socket is refused before it is read (it could block or never
    end); the file is opened without blocking and checked again once open (it may have been swapped since), and
    at most ``limit + 1`` bytes are read (a file that grows is still refused).

    Raises:
        SpecError: no such file, not a regular file, larger than ``limit``, or unreadable.
    """
    pos = Pos(file)
    try:
        kind = regular_file_kind(file)
        if kind == MISSING:
            raise SpecError(f"no such file: {file}", pos=pos)
        if kind is not None:
            raise SpecError(f"{file} is {kind}, not a spec file", pos=pos, hint="a spec is a regular YAML file")
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise SpecError(f"{file} is {describe_kind(mode)}, not a spec file", pos=pos)
            chunks, size = [], 0
            while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - size))):
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
    except FileNotFoundError as e:
        raise SpecError(f"no such file: {file}", pos=pos) from e
    except OSError as e:
        raise SpecError(f"cannot read {file}: {e.strerror}", pos=pos) from e
    if size > limit:
        raise SpecError(f"the spec is larger than {limit:,} bytes", pos=pos)
    return b"".join(chunks)


def load_file(path: str | os.PathLike[str]) -> Node:
    """Read and parse one spec file (:func:`read_regular`, then :func:`load_text`)."""
    file = os.fspath(path)
    return load_text(_decode(read_regular(file), file), file)
