"""Tests of blockgraph.spec.load: positioned YAML loading, and everything it refuses to load."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from blockgraph.errors import Pos, SpecError
from blockgraph.spec import load
from blockgraph.spec.load import MAX_DEPTH, MAX_NODES, Node, load_file, load_text, load_value
from tests.conftest import ROOT
from tests.support.positions import at, first_at, where
from tests.support.processes import probe_loads


def walk(root: Node, path: tuple[Any, ...]) -> Node:
    node = root
    for part in path:
        node = node.value[part]
    return node


# ---------------------------------------------------------------------------------------------------------- positions

SPEC = """\
name: tiny
dims: [64, 128]
block:
  op: mlp
  ratio: 4.0
items:
  - first
  - {k: val}
quoted: "dq"
single: 'sq'
"""

SCALARS = [
    (("name",), "tiny"),
    (("dims", 0), "64"),
    (("dims", 1), "128"),
    (("block", "op"), "mlp"),
    (("block", "ratio"), "4.0"),
    (("items", 0), "first"),
    (("items", 1, "k"), "val"),
    (("quoted",), '"dq"'),
    (("single",), "'sq'"),
]
COLLECTIONS = [
    (("dims",), "[64"),
    (("block",), "op: mlp"),
    (("items",), "- first"),
    (("items", 1), "{k"),
]
KEYS = [
    (("name",), "name:"),
    (("dims",), "dims:"),
    (("block",), "block:"),
    (("block", "op"), "op:"),
    (("block", "ratio"), "ratio:"),
    (("items", 1, "k"), "k: val"),
    (("quoted",), "quoted:"),
]


@pytest.mark.parametrize(("path", "marker"), SCALARS + COLLECTIONS, ids=[str(p) for p, _ in SCALARS + COLLECTIONS])
def test_value_positions(path: tuple[Any, ...], marker: str) -> None:
    node = walk(load_text(SPEC, "spec.yaml"), path)
    assert node.pos.file == "spec.yaml"
    assert where(node.pos) == at(SPEC, marker)


@pytest.mark.parametrize(("path", "marker"), KEYS, ids=[str(p) for p, _ in KEYS])
def test_key_positions(path: tuple[Any, ...], marker: str) -> None:
    assert where(walk(load_text(SPEC), path).key_pos) == at(SPEC, marker)


def test_list_items_and_the_root_have_no_key_position() -> None:
    root = load_text(SPEC)
    assert root.key_pos is None
    assert where(root.pos) == (1, 1)
    assert root.value["items"].value[0].key_pos is None
    assert root.value["dims"].value[1].key_pos is None


def test_quoted_scalars_are_marked() -> None:
    root = load_text(SPEC)
    assert root.value["quoted"].meta == {"quoted": True}
    assert root.value["single"].meta == {"quoted": True}
    assert root.value["name"].meta == {"quoted": False}
    assert root.value["quoted"].value == "dq"


def test_crlf_line_endings_count_as_one_line() -> None:
    root = load_text("a: 1\r\nb: [1,\r\n  22]\r\n")
    assert where(root.value["b"].value[1].pos) == (3, 3)


def test_plain_drops_positions_and_matches_pyyaml() -> None:
    root = load_text(SPEC)
    assert root.plain() == yaml.safe_load(SPEC)
    assert root.plain() == {
        "name": "tiny",
        "dims": [64, 128],
        "block": {"op": "mlp", "ratio": 4.0},
        "items": ["first", {"k": "val"}],
        "quoted": "dq",
        "single": "sq",
    }


def test_from_plain_round_trips_and_positions_every_value() -> None:
    data = {"a": [1, {"b": None}], "c": (2, 3)}
    node = Node.from_plain(data, Pos("<override>"))
    assert node.plain() == {"a": [1, {"b": None}], "c": [2, 3]}
    assert node.value["a"].value[1].value["b"].pos == Pos("<override>")


# ------------------------------------------------------------------------------------------------------ duplicate keys

DUPLICATES = [
    ("block style", "name: a\nother: 1\nname: b\n", "name: b", 1),
    ("flow style", "name: a\nx: {k: 1, k: 2}\n", "k: 2", 2),
    ("nested", "name: a\nx:\n  k: 1\n  j: 2\n  k: 3\n", "k: 3", 3),
    ("one integer spelled twice", "name: a\nm:\n  1: a\n  0x1: b\n", "0x1", 3),
]


@pytest.mark.parametrize(("text", "marker", "first_line"), [d[1:] for d in DUPLICATES], ids=[d[0] for d in DUPLICATES])
def test_duplicate_keys_are_rejected(text: str, marker: str, first_line: int) -> None:
    with pytest.raises(SpecError, match="duplicate key") as info:
        load_text(text)
    assert where(info.value.pos) == at(text, marker)
    assert f"already set at line {first_line}" in info.value.hint


# ------------------------------------------------------------------------------------------------------------- merges

MERGE = """\
base: &base {op: mlp, dim: 32, ratio: 4}
block:
  <<: *base
  dim: 64
before:
  dim: 96
  <<: *base
"""


def test_merge_keys_copy_the_anchor_and_own_keys_win() -> None:
    root = load_text(MERGE)
    assert root.plain()["block"] == {"op": "mlp", "dim": 64, "ratio": 4}
    assert root.plain()["before"] == {"op": "mlp", "dim": 96, "ratio": 4}
    assert where(root.value["block"].value["op"].pos) == at(MERGE, "mlp")  # where the anchor wrote it
    assert where(root.value["block"].value["dim"].pos) == at(MERGE, "64")


def test_merge_of_several_mappings_earlier_wins() -> None:
    text = "a: &a {x: 1}\nb: &b {x: 2, y: 2}\nd:\n  <<: [*a, *b]\n"
    assert load_text(text).plain()["d"] == {"x": 1, "y": 2}


@pytest.mark.parametrize(
    ("text", "marker"),
    [("a: &s 3\nb:\n  <<: *s\n", "&s"), ("a:\n  <<: [1]\n", "1]")],
    ids=["scalar alias", "list of scalars"],
)
def test_merge_of_a_non_mapping_is_rejected(text: str, marker: str) -> None:
    with pytest.raises(SpecError, match=r"'<<' \(merge key\) needs a mapping") as info:
        load_text(text)
    assert where(info.value.pos) == at(text, marker)


# --------------------------------------------------------------------------------------------------------------- tags

TAGS = [
    ("!!python/object:os.system", "tag:yaml.org,2002:python/object:os.system"),
    ("!!python/object/apply:os.system", "tag:yaml.org,2002:python/object/apply:os.system"),
    ("!!binary", "tag:yaml.org,2002:binary"),
    ("!!set", "tag:yaml.org,2002:set"),
    ("!!timestamp", "tag:yaml.org,2002:timestamp"),
    ("!!omap", "tag:yaml.org,2002:omap"),
    ("!foo", "!foo"),
]
BODIES = [("scalar", "aGVsbG8="), ("mapping", "{a: 1}"), ("sequence", "[1, 2]")]


@pytest.mark.parametrize(("kind", "body"), BODIES, ids=[b[0] for b in BODIES])
@pytest.mark.parametrize(("tag", "full"), TAGS, ids=[t[0] for t in TAGS])
def test_non_standard_tags_are_rejected(tag: str, full: str, kind: str, body: str) -> None:
    text = f"name: x\nvalue: {tag} {body}\n"
    with pytest.raises(SpecError, match=f"YAML tag '{full}' is not allowed") as info:
        load_text(text)
    assert where(info.value.pos) == at(text, tag)
    assert "plain data" in info.value.hint


def test_implicit_timestamps_are_rejected_and_quoted_dates_are_strings() -> None:
    with pytest.raises(SpecError, match="timestamp"):
        load_text("name: x\ndate: 2001-12-14\n")
    assert load_text('name: x\ndate: "2001-12-14"\n').plain()["date"] == "2001-12-14"


def test_standard_tags_are_accepted() -> None:
    text = "a: !!str 12\nb: !!int '7'\nc: !!map {k: !!seq [1]}\nd: !!float 1\n"
    assert load_text(text).plain() == {"a": "12", "b": 7, "c": {"k": [1]}, "d": 1.0}


@pytest.mark.parametrize("value", ["!!int x", "!!float x", "!!bool x"])
def test_standard_tag_with_unreadable_content_is_a_spec_error(value: str) -> None:
    text = f"name: a\nvalue: {value}\n"
    with pytest.raises(SpecError) as info:
        load_text(text)
    assert where(info.value.pos) == at(text, value)


# ----------------------------------------------------------------------------------------------------- billion laughs


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_rejected_with_a_spec_error_about_expanding() -> None:
    with pytest.raises(SpecError, match=f"the spec expands to more than {MAX_NODES:,} values") as info:
        load_text(billion_laughs())
    assert "aliases (*name) are expanded on load" in info.value.hint


def test_billion_laughs_is_rejected_before_it_is_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    # "Fails fast", measured deterministically (no wall clock): rejecting the file costs about its size
    # (~100 YAML nodes), not the size of the expansion it refuses.
    built = 0

    class CountingNode(Node):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            nonlocal built
            built += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(load, "Node", CountingNode)
    with pytest.raises(SpecError, match="expands to more than"):
        load_text(billion_laughs())
    assert built < 10_000, f"built {built:,} values before rejecting the file"


def test_small_aliases_are_expanded() -> None:
    root = load_text("a: &x [1, 2]\nb: [*x, *x]\n")
    assert root.plain() == {"a": [1, 2], "b": [[1, 2], [1, 2]]}


# --------------------------------------------------------------------------------------------------- bytes and files


@pytest.mark.parametrize(
    ("data", "marker", "byte"),
    [
        (b"name: x\ndesc: caf\xe9\n", b"\xe9", "0xe9"),  # latin-1
        (b"name: x\ndesc: \xe2\x82\n", b"\xe2", "0xe2"),  # a truncated 3-byte sequence
        (b"\xff\xfename: x\n", b"\xff", "0xff"),
    ],
    ids=["latin-1", "truncated", "first byte"],
)
def test_non_utf8_bytes_are_rejected_at_their_line(tmp_path: Path, data: bytes, marker: bytes, byte: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(data)
    with pytest.raises(SpecError, match=f"not valid UTF-8 \\(byte {byte}\\)") as info:
        load_file(path)
    assert info.value.file == str(path)
    assert where(info.value.pos) == at(data.decode("latin-1"), marker.decode("latin-1"))
    assert info.value.hint == "save the file as UTF-8"


@pytest.mark.parametrize(
    "data",
    [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"name: x\x00\n", "name: x\n".encode("utf-16")],
    ids=["png", "nul in text", "utf-16"],
)
def test_binary_files_are_rejected(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(data)
    with pytest.raises(SpecError, match="binary file, not a YAML spec") as info:
        load_file(path)
    assert info.value.file == str(path)


BAD_CHARACTERS = [
    ("nul in the first 8 KiB", b"name: x\nb: 1\x00\n", b"\x00"),
    ("nul after 8 KiB", b"name: x\n" + b"#" * 9000 + b"\nb: 1\x00\n", b"\x00"),
    ("control character", b"name: x\nb: a\x07b\n", b"\x07"),
]


@pytest.mark.parametrize(("data", "marker"), [c[1:] for c in BAD_CHARACTERS], ids=[c[0] for c in BAD_CHARACTERS])
def test_a_bad_character_is_reported_at_its_line(tmp_path: Path, data: bytes, marker: bytes) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(data)
    with pytest.raises(SpecError) as info:
        load_file(path)
    assert where(info.value.pos) == at(data.decode("latin-1"), marker.decode("latin-1"))


def test_a_bad_character_in_text_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="unacceptable character #x0000"):
        load_text("name: x\nb: 1\x00\n")


def test_utf8_bom_is_accepted_and_does_not_shift_columns(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: caf\xc3\xa9\nb: 1\n")
    root = load_file(path)
    assert root.plain() == {"name": "café", "b": 1}
    assert where(root.value["name"].pos) == (1, 7)
    assert root.value["name"].pos.file == str(path)


def test_load_file_reads_a_path(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC, encoding="utf-8")
    root = load_file(path)
    assert root.plain() == load_text(SPEC).plain()
    assert root.value["dims"].pos == Pos(str(path), *at(SPEC, "[64"))


# ------------------------------------------------------------------------------------------------- whole-file shapes

BAD_DOCUMENTS = [
    ("empty", "", "the spec is empty"),
    ("blank lines", "\n\n", "the spec is empty"),
    ("only a comment", "# nothing here\n", "the spec is empty"),
    ("several documents", "name: a\n---\nname: b\n", "several YAML documents"),
    ("a list", "- name: a\n", "a spec must be a mapping"),
    ("a scalar", "just text\n", "a spec must be a mapping"),
    ("a number", "42\n", "a spec must be a mapping"),
    ("null", "~\n", "a spec must be a mapping"),
    ("an empty explicit document", "---\n", "a spec must be a mapping"),
]


@pytest.mark.parametrize(("text", "message"), [d[1:] for d in BAD_DOCUMENTS], ids=[d[0] for d in BAD_DOCUMENTS])
def test_documents_that_are_not_one_mapping_are_rejected(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        load_text(text, "spec.yaml")
    assert info.value.file == "spec.yaml"


def test_syntax_error_points_at_the_problem() -> None:
    text = "name: x\nsize: [64, 64}\n"
    with pytest.raises(SpecError, match="YAML syntax: expected ',' or ']'") as info:
        load_text(text)
    assert where(info.value.pos) == at(text, "}")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match="no such file") as info:
        load_file(path)
    assert info.value.file == str(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a directory, not a spec file") as info:
        load_file(tmp_path)
    assert info.value.file == str(tmp_path)


@pytest.mark.parametrize("nested", ["[" * 100_000 + "]" * 100_000, "\n  " + "- " * 100_000 + "x"])
def test_runaway_nesting_is_a_spec_error_not_a_crash(nested: str) -> None:
    """Refused as it is read, at the first level too deep (the composer does not recurse: no stack to overflow)."""
    with pytest.raises(SpecError, match=f"nests collections more than {MAX_DEPTH} levels deep") as info:
        load_text("a: " + nested, "deep.yaml")
    assert info.value.line in (1, 2)


def test_reference_specs_are_read_by_libyaml_and_give_the_same_nodes(monkeypatch) -> None:
    """libyaml's parser is the one used for every reference spec, and its nodes (values and positions) equal those
    of the pure-Python parser."""
    used = []
    compose_with = load._compose_with
    monkeypatch.setattr(load, "_compose_with", lambda loader, *a: used.append(loader) or compose_with(loader, *a))
    for path in sorted((ROOT / "specs").glob("*.yaml")):
        text = path.read_text()
        fast = load_text(text, path.name)
        monkeypatch.setattr(load, "_FAST_LOADER", None)
        slow = load_text(text, path.name)
        monkeypatch.setattr(load, "_FAST_LOADER", yaml.CSafeLoader)
        assert fast == slow  # values, positions, key positions
    assert used.count(yaml.CSafeLoader) == len(used) // 2 > 20


# -------------------------------------------------------------------------------------------- hostile input, bounded

VALID = "name: x\nstages: []\n"
MIB4 = 4_000_000


def _deep_aliases() -> str:
    """Every anchor is 150 levels deep, and each aliases the one before one level further in: 150 + 1 + ... > 200
    only once aliases are expanded."""
    lines = ["a0: &a0 " + "[" * 150 + "]" * 150]
    lines += [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 60)]
    return "\n".join(lines) + "\n"


HOSTILE: list[tuple[str, Any, str | None, str | None]] = [
    # (id, the file's text or bytes, or a function of tmp_path giving its path; what the error says, or None for a
    # file that loads; a marker whose line the error points at)
    ("recursive alias in a list", VALID + "r: &r [*r]\n", "alias \\*r is inside the collection it names", "*r]"),
    ("recursive alias in a mapping", VALID + "m: &m {a: 1, me: *m}\n", "alias \\*m is inside", "*m}"),
    ("recursive merge key", VALID + "m: &m\n  a: 1\n  <<: *m\n", "alias \\*m is inside", "*m\n"),
    ("recursive alias two levels down", VALID + "a: &a\n  b:\n    - c: *a\n", "alias \\*a is inside", "*a\n"),
    ("undefined alias", VALID + "a: *nope\n", "alias \\*nope names no anchor", "*nope"),
    ("duplicate anchor", VALID + "a: &x 1\nb: &x 2\n", "anchor &x is defined twice", "&x 2"),
    ("1 MB of `-` lines", "-\n" * 500_000, "expands to more than 200,000 values", None),
    ("4 MB of `-` lines", "-\n" * (MIB4 // 2 - 1), "expands to more than 200,000 values", None),
    ("4 MB flow list", "a: [" + "0," * (MIB4 // 2 - 4) + "0]", "expands to more than 200,000 values", None),
    ("4 MB of `[`", "a: " + "[" * (MIB4 - 10), "nest", None),  # libyaml's scanner may see it first
    ("4 MB of `- `", "a:\n" + "- " * (MIB4 // 2 - 4), "nests collections more than 200 levels", None),
    ("billion laughs", billion_laughs(), "expands to more than 200,000 values", None),
    ("nesting through aliases", _deep_aliases(), "nests collections more than 200 levels", "*a49]"),
    ("4 MB scalar", "name: " + "x" * (MIB4 - 10) + "\n", None, None),
    ("4 MB comment", VALID + "#" + "y" * (MIB4 - 30) + "\n", None, None),
    ("60,000 anchors", VALID + "".join(f"k{i}: &a{i} {i}\n" for i in range(60_000)), None, None),
    ("larger than the limit", VALID + "#" * MIB4, "the spec is larger than 4,000,000 bytes", None),
    ("syntax error after 3 MB", "#" * 3_000_000 + "\nname: [x}\n", "YAML syntax", "}"),
    ("bad character after 3 MB", "#" * 3_000_000 + "\nname: a\x07\n", "unacceptable character #x0007", "\x07"),
    ("huge integer", VALID + "n: " + "1" * 100_000 + "\n", "cannot read '1111", "1111"),
    ("huge undefined alias", VALID + "a: *" + "x" * 1_000_000 + "\n", "names no anchor", "*xxx"),
    ("a FIFO", lambda tmp: (os.mkfifo(tmp / "spec.yaml"), tmp / "spec.yaml")[1], "is a FIFO", None),
    ("a link to /dev/zero", lambda tmp: _link(tmp, "/dev/zero"), "is a character device, not a spec file", None),
    ("a link to /dev/urandom", lambda tmp: _link(tmp, "/dev/urandom"), "is a character device", None),
    ("a directory", lambda tmp: tmp, "is a directory, not a spec file", None),
]


def _link(tmp: Path, target: str) -> Path:
    (tmp / "spec.yaml").symlink_to(target)
    return tmp / "spec.yaml"


PURE = [
    ("4 MB of dashes, pure Python", "-\n" * (MIB4 // 2 - 1)),
    ("recursive alias, pure Python", VALID + "r: &r [*r]\n"),
]


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every hostile file loaded, one after the other, in one process of its own (killed after 60 s, unable to map
    more than 1 GiB), so that a hang or a runaway allocation fails these tests and not the test run; the pure-Python
    parser (where libyaml is missing) gets a few of them too."""
    paths = {}
    for name, make, *_ in HOSTILE + PURE:
        tmp = tmp_path_factory.mktemp("hostile")
        if callable(make):
            paths[name] = make(tmp)
        else:
            paths[name] = tmp / "spec.yaml"
            paths[name].write_bytes(make.encode())
    calls = [("load_file", paths[name], name in dict(PURE)) for name in paths]
    return dict(zip(paths, probe_loads(calls), strict=True))


@pytest.mark.parametrize(("name", "make", "message", "marker"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_files_fail_fast_with_a_spec_error(
    hostile_results: dict[str, dict[str, Any]], name: str, make: Any, message: str | None, marker: str | None
) -> None:
    """Each file loads, or is refused with a SpecError at its line, within 5 s; no message echoes more than an
    excerpt of it."""
    out = hostile_results[name]
    assert out["seconds"] < 5, out
    if message is None:
        assert out["error"] is None, out
        return
    assert out["error"] == "SpecError", out
    assert re.search(message, out["message"]), out
    assert len(out["message"]) + len(out["hint"] or "") < 400, out  # an excerpt at most, never the file
    if marker is not None:
        assert out["line"] == first_at(make, marker)[0], out


@pytest.mark.parametrize("name", [name for name, _ in PURE])
def test_hostile_text_fails_fast_without_libyaml(hostile_results: dict[str, dict[str, Any]], name: str) -> None:
    out = hostile_results[name]
    assert out["error"] == "SpecError" and out["seconds"] < 5, out


def test_an_alias_may_repeat_a_complete_collection_inside_another() -> None:
    root = load_text("a: &a [1]\nb: &b {x: *a, y: [*a, *a]}\nc: [*b]\n")
    assert root.plain()["c"] == [{"x": [1], "y": [[1], [1]]}]


def test_load_value_reads_any_value_under_the_same_limits() -> None:
    assert load_value("[1, 2]", "<--set a>").plain() == [1, 2]
    assert load_value("", "<--set a>").plain() is None
    assert load_value("3", "<--set a>").plain() == 3
    with pytest.raises(SpecError, match="expands to more than") as info:
        load_value(billion_laughs(), "<--set a>")
    assert info.value.file == "<--set a>"


def test_a_file_that_is_not_a_mapping_is_not_shown(tmp_path: Path) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("- sk-live-0123456789\n- another secret\n")
    with pytest.raises(SpecError, match="this file is a list") as info:
        load_file(path)
    assert "sk-live" not in str(info.value)
