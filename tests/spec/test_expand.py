"""Tests of blockgraph.spec.expand: variables, expressions, templates, repeats, extends, variants, overrides, and
the SourceMap that leads every expanded value back to the text that produced it."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockgraph.errors import SpecError
from blockgraph.spec import expand as expand_module
from blockgraph.spec.expand import Expanded, expand
from tests.support.positions import at, where


def run(text: str, **kwargs: Any) -> Expanded:
    return expand(None, text=text, file="spec.yaml", **kwargs)  # type: ignore[arg-type]


def fails(text: str, match: str, **kwargs: Any) -> SpecError:
    with pytest.raises(SpecError, match=match) as info:
        run(text, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------------------------ variables

VARIABLES = """\
variables:
  first: ${second + 1}
  second: ${base * 3}
  base: 2
  dims: [64, 128]
  label: "n${base}"
  name: coat
x: ${first}
"""


def test_variables_may_use_variables_defined_later() -> None:
    out = run(VARIABLES)
    assert out.data["x"] == 7
    assert out.data["variables"] == {
        "first": 7,
        "second": 6,
        "base": 2,
        "dims": [64, 128],
        "label": "n2",
        "name": "coat",
    }


def test_a_variable_is_only_evaluated_from_its_final_definition() -> None:
    # `a` is never evaluated as written (it would fail): the override replaces it first.
    out = run('variables: {a: "${missing}", b: 1}\nx: ${a + b}\n', overrides={"a": 5})
    assert out.data["x"] == 6
    assert out.data["variables"] == {"a": 5, "b": 1}


def test_variables_in_a_cycle() -> None:
    text = 'variables: {a: "${b}", b: "${a}"}\nx: ${a}\n'
    error = fails(text, r"variables refer to each other in a cycle: a -> b -> a")
    assert where(error.pos) == at(text, '"${b}"')


@pytest.mark.parametrize(
    ("text", "marker", "skip"),
    [("x: ${dimm}\n", "dimm", 0), ('x: "${dimm + 1}"\n', "dimm", 0), ('x: "a-${dimm}"\n', "dimm", 0)],
    ids=["plain", "quoted", "interpolated"],
)
def test_undefined_variable_points_at_the_name(text: str, marker: str, skip: int) -> None:
    text = "variables: {dim: 1}\n" + text
    error = fails(text, "undefined variable 'dimm'")
    assert where(error.pos) == at(text, marker, skip)
    assert "did you mean 'dim'" in error.hint


@pytest.mark.parametrize("name", ["rep", "not-a-name", "1x"])
def test_variable_names_must_be_usable(name: str) -> None:
    fails(f"variables: {{'{name}': 1}}\nx: 1\n", "is not usable in expressions")


# ---------------------------------------------------------------------------------------------------------- expressions

SCALARS = [
    ("${n}", 2),
    ('"${n}"', 2),  # quoting does not make a single expression a string
    ("${dims}", [64, 128]),
    ("${dims[n - 1]}", 128),
    ("${n / 4}", 0.5),
    ("${n > 1}", True),
    ("${name}", "coat"),
    ("${None}", None),
    ('"v${n}"', "v2"),
    ('" ${n} "', " 2 "),
    ('"d${dims}"', "d[64, 128]"),
    ('"${name}-${n}"', "coat-2"),
    ('"$${n} ${n}"', "${n} 2"),
    ("plain", "plain"),
    ("${n} and ${n}", "2 and 2"),
]


@pytest.mark.parametrize(("written", "expected"), SCALARS, ids=[s[0] for s in SCALARS])
def test_typed_and_interpolated_scalars(written: str, expected: Any) -> None:
    out = run(f"variables: {{n: 2, dims: [64, 128], name: coat}}\nx: {written}\n")
    assert out.data["x"] == expected
    assert type(out.data["x"]) is type(expected)


def test_an_escape_alone_is_unescaped() -> None:
    assert run('variables: {n: 2}\nx: "$${n}"\n').data["x"] == "${n}"


# ------------------------------------------------------------------------------------------------------------ templates


def test_for_with_one_name() -> None:
    out = run("stages:\n  - for: {i: [0, 1, 2]}\n    name: s${i + 1}\n    width: ${i * 10}\n  - name: last\n")
    assert out.data["stages"] == [
        {"name": "s1", "width": 0},
        {"name": "s2", "width": 10},
        {"name": "s3", "width": 20},
        {"name": "last"},
    ]


def test_for_with_several_names_zips_them() -> None:
    out = run("stages:\n  - for: {i: [0, 1], tag: [a, b]}\n    name: s${i}${tag}\n")
    assert [s["name"] for s in out.data["stages"]] == ["s0a", "s1b"]


def test_for_over_an_expression_and_an_empty_list() -> None:
    text = 'variables: {dims: [8, 16, 32]}\nstages:\n  - for: {i: "${range(len(dims))}"}\n    dim: ${dims[i]}\n'
    assert run(text).data["stages"] == [{"dim": 8}, {"dim": 16}, {"dim": 32}]
    assert run("stages:\n  - for: {i: []}\n    name: s\n").data["stages"] == []


def test_for_lists_of_different_lengths() -> None:
    text = "stages:\n  - for: {i: [0, 1], j: [a, b, c]}\n    name: t\n"
    error = fails(text, r"`for:` lists have different lengths: i: 2, j: 3")
    assert where(error.pos) == at(text, "{i:")
    assert "zipped" in error.hint


@pytest.mark.parametrize(
    ("loop", "marker", "message"),
    [("[1, 2]", "[1, 2]", "takes a mapping of names to lists"), ("{}", "{}", "takes a mapping"),
     ("{i: 3}", "3", "variable 'i' needs a list of values")],
)  # fmt: skip
def test_bad_for(loop: str, marker: str, message: str) -> None:
    text = f"stages:\n  - for: {loop}\n    name: s\n"
    assert where(fails(text, message).pos) == at(text, marker)


# -------------------------------------------------------------------------------------------------------------- repeats

REPEATS = """\
stages:
  - name: s
    blocks:
      - {name: a, op: x}
      - {name: b, op: x, depth: 3, r: "${rep}", label: "n${rep}"}
      - {name: c, op: x, depth: 0}
      - {op: y, depth: 2}
      - {name: d, op: x}
"""


def test_depth_repeats_a_block_with_rep_bound() -> None:
    blocks = run(REPEATS).data["stages"][0]["blocks"]
    assert blocks == [
        {"name": "a", "op": "x"},
        {"name": "b.0", "op": "x", "r": 0, "label": "n0"},
        {"name": "b.1", "op": "x", "r": 1, "label": "n1"},
        {"name": "b.2", "op": "x", "r": 2, "label": "n2"},
        {"name": "y.0", "op": "y"},  # the name defaults to the op
        {"name": "y.1", "op": "y"},
        {"name": "d", "op": "x"},
    ]


def test_depth_only_repeats_entries_of_a_blocks_list() -> None:
    assert run("stages:\n  - {name: s, depth: 3}\n").data["stages"] == [{"name": "s", "depth": 3}]


def test_depth_from_a_template_variable() -> None:
    text = "stages:\n  - for: {i: [0, 1, 2]}\n    name: s${i}\n    blocks:\n      - {op: b, depth: '${i}'}\n"
    assert [len(s["blocks"]) for s in run(text).data["stages"]] == [0, 1, 2]


@pytest.mark.parametrize(
    ("depth", "message"),
    [
        ("-1", r"`depth` must be a non-negative integer, got -1"),
        ("2.5", r"`depth` must be a non-negative integer, got 2.5"),
        ("true", r"`depth` must be a non-negative integer, got True"),
        ("three", r"`depth` must be a non-negative integer, got 'three'"),
        ("10000000", r"`depth` 10,000,000 would expand the spec past the limit of 10,000 entries"),
        ('"${10**7}"', r"`depth` 10,000,000 would expand the spec past the limit of 10,000 entries"),
    ],
)
def test_bad_depth_is_rejected_fast(depth: str, message: str) -> None:
    text = f"stages:\n  - name: s\n    blocks:\n      - {{name: b, op: x, depth: {depth}}}\n"
    start = time.perf_counter()
    error = fails(text, message)
    assert time.perf_counter() - start < 0.5
    assert where(error.pos) == at(text, depth + "}")


def test_for_over_a_huge_range_fails_fast() -> None:
    text = 'stages:\n  - for: {i: "${range(200000)}"}\n    name: t\n'
    start = time.perf_counter()
    error = fails(text, r"range\(\) would make 200,000 items; the limit is 100,000")
    assert time.perf_counter() - start < 0.5
    assert where(error.pos) == at(text, "range")


def test_templates_and_repeats_together_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(expand_module, "MAX_EXPANDED", 10)
    text = "stages:\n  - for: {i: [0, 1, 2, 3, 4, 5]}\n    name: s\n    blocks:\n      - {op: b, depth: 2}\n"
    error = fails(text, "`depth` 2 would expand the spec past the limit of 10 entries")
    assert where(error.pos) == at(text, "2}")


# -------------------------------------------------------------------------------------------------------------- extends


@dataclass
class Family:
    """Three files: sub/leaf.yaml extends sub/mid.yaml extends base.yaml, as written."""

    base: Path
    mid: Path
    leaf: Path
    texts: dict[str, str]


BASE = """\
name: base
variables:
  dim: 32
  depth: 2
opts:
  a: 1
  b: {c: 2, d: 3}
  l: [1, 2, 3]
variants:
  big:
    variables: {dim: 64}
    opts: {a: 10}
  small:
    name: tiny
"""
MID = """\
extends: ../base.yaml
name: mid
opts:
  b: {c: 20}
"""
LEAF = """\
extends: mid.yaml
name: leaf
opts:
  l: [9]
x: ${dim}
"""


@pytest.fixture
def family(tmp_path: Path) -> Family:
    (tmp_path / "sub").mkdir()
    paths = {
        "base": tmp_path / "base.yaml",
        "mid": tmp_path / "sub" / "mid.yaml",
        "leaf": tmp_path / "sub" / "leaf.yaml",
    }
    texts = {"base": BASE, "mid": MID, "leaf": LEAF}
    for key, path in paths.items():
        path.write_text(texts[key])
    return Family(paths["base"], paths["mid"], paths["leaf"], texts)


def test_extends_chain_merges_deeply_and_replaces_lists(family: Family, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # paths are relative to the file that says `extends:`, not to the cwd
    out = expand(family.leaf)
    assert out.data["name"] == "leaf"
    assert out.data["opts"] == {"a": 1, "b": {"c": 20, "d": 3}, "l": [9]}
    assert out.data["x"] == 32  # a variable of the base, used in the leaf
    assert out.data["variables"] == {"dim": 32, "depth": 2}
    assert out.variant is None and "variant" not in out.data


def test_extends_positions_point_at_the_file_that_set_the_value(family: Family) -> None:
    source = expand(family.leaf).source
    cases = [
        (("opts", "a"), family.base, BASE, "1\n  b:"),
        (("opts", "b", "d"), family.base, BASE, "3}"),
        (("opts", "b", "c"), family.mid, MID, "20"),
        (("opts", "l", 0), family.leaf, LEAF, "9"),
        (("name",), family.leaf, LEAF, "leaf"),
    ]
    for path, file, text, marker in cases:
        pos = source.value(path)
        assert (pos.file, where(pos)) == (str(file), at(text, marker)), path


def test_extends_cycle_is_reported_with_the_chain(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("name: a\nextends: b.yaml\n")
    b.write_text("name: b\nextends: a.yaml\n")
    with pytest.raises(SpecError, match="`extends:` forms a cycle") as info:
        expand(a)
    assert f"{a} -> {b} -> {a}" in info.value.message
    assert info.value.file == str(b)
    assert where(info.value.pos) == (2, 10)


def test_a_file_that_extends_itself(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("name: a\nextends: a.yaml\n")
    with pytest.raises(SpecError, match=re.escape(f"forms a cycle: {a} -> {a}")):
        expand(a)


def test_extends_missing_file_is_reported_with_the_chain(tmp_path: Path) -> None:
    top, mid = tmp_path / "m.yaml", tmp_path / "mid.yaml"
    top.write_text("name: m\nextends: mid.yaml\n")
    mid.write_text("name: mid\nextends: gone.yaml\n")
    with pytest.raises(SpecError, match="`extends:` names a file that does not exist: .*gone.yaml") as info:
        expand(top)
    assert info.value.file == str(mid)
    assert where(info.value.pos) == (2, 10)
    assert f"{top} -> {mid} -> {tmp_path / 'gone.yaml'}" in info.value.hint


@pytest.mark.parametrize("value", ["''", "[a.yaml]", "3"])
def test_extends_needs_a_file_name(value: str) -> None:
    fails(f"name: x\nextends: {value}\n", r"`extends:` takes a file name")


# ------------------------------------------------------------------------------------------------------------- variants

OWN_VARIANT = """\
name: m
variables: {a: 1}
x: ${a}
variants:
  one: {variables: {a: 2}}
  two: {x: 3}
  named: {name: other}
variant: one
"""


@pytest.mark.parametrize(
    ("argument", "name", "x", "chosen"),
    [
        (None, "m", 2, "one"),  # the spec's own `variant:` keeps the spec's name
        ("one", "m_one", 2, "one"),  # chosen by argument: base_variant
        ("two", "m_two", 3, "two"),  # the argument wins over the spec's `variant:`
        ("named", "other", 1, "named"),  # a variant that sets `name:` keeps it
    ],
)
def test_variant_choice_and_name(argument: str | None, name: str, x: int, chosen: str) -> None:
    out = run(OWN_VARIANT, variant=argument)
    assert (out.data["name"], out.data["x"], out.variant, out.data["variant"]) == (name, x, chosen, chosen)
    assert "variants" not in out.data
    assert "variant" not in out.standalone()


def test_variant_of_a_parent_file(family: Family) -> None:
    out = expand(family.leaf, variant="big")
    assert (out.data["name"], out.data["x"], out.data["opts"]["a"]) == ("leaf_big", 64, 10)
    assert expand(family.leaf, variant="small").data["name"] == "tiny"


def test_unknown_variant_by_argument() -> None:
    with pytest.raises(SpecError, match="unknown variant 'onee'") as info:
        run(OWN_VARIANT, variant="onee")
    assert info.value.file == "<variant argument>"
    assert info.value.hint == "did you mean 'one'? variants: one, two, named"


def test_unknown_variant_in_the_spec_points_at_it() -> None:
    text = OWN_VARIANT.replace("variant: one", "variant: zzz")
    error = fails(text, "unknown variant 'zzz'")
    assert where(error.pos) == at(text, "zzz")
    assert error.hint == "variants: one, two, named"


def test_variant_without_variants() -> None:
    error = fails("name: m\nvariant: big\n", "variant 'big' asked for, but this spec declares no `variants:`")
    assert where(error.pos) == (2, 10)


# ------------------------------------------------------------------------------------------------------------ overrides


def test_override_replaces_a_variable_everywhere() -> None:
    out = run(VARIABLES, overrides={"base": 10})
    assert out.data["x"] == 31
    assert out.data["variables"]["second"] == 30


@pytest.mark.parametrize(
    ("name", "hint"),
    [("bsae", "did you mean 'base'? variables: first, second, base, dims, label, name"),
     ("zzzz", "variables: first, second, base, dims, label, name")],
)  # fmt: skip
def test_unknown_override(name: str, hint: str) -> None:
    error = fails(VARIABLES, f"override of unknown variable '{name}'", overrides={name: 1})
    assert error.file == "<overrides>"
    assert error.hint == hint + "; or a dotted path into the spec (`stages.stage4.blocks.blocks.depth`)"


# ------------------------------------------------------------------------------------------------------------ sourcemap


def test_a_value_from_a_variable_points_at_the_use_then_the_definition() -> None:
    pos = run(VARIABLES).source.value(("x",))
    assert where(pos) == at(VARIABLES, "${first}")
    assert [(label, where(origin)) for label, origin in pos.trail()] == [
        ("variable 'first' defined", at(VARIABLES, "${second + 1}"))
    ]


def test_a_plain_value_has_no_trail() -> None:
    pos = run("name: m\n").source.value(("name",))
    assert where(pos) == (1, 7)
    assert list(pos.trail()) == []


def test_a_variable_defined_in_a_parent_leads_to_the_parent(family: Family) -> None:
    pos = expand(family.leaf).source.value(("x",))
    assert (pos.file, where(pos)) == (str(family.leaf), at(LEAF, "${dim}"))
    ((label, origin),) = pos.trail()
    assert (label, origin.file, where(origin)) == ("variable 'dim' defined", str(family.base), at(BASE, "32"))


def test_values_set_by_a_variant_point_at_the_variant(family: Family) -> None:
    out = expand(family.leaf, variant="big")
    a = out.source.value(("opts", "a"))
    assert (a.file, where(a)) == (str(family.base), at(BASE, "10}"))
    ((_, origin),) = out.source.value(("x",)).trail()
    assert where(origin) == at(BASE, "64}")


def test_an_overridden_variable_leads_to_the_override() -> None:
    pos = run(VARIABLES, overrides={"first": 1}).source.value(("x",))
    assert [(label, origin.file) for label, origin in pos.trail()] == [("variable 'first' defined", "<override first>")]


def test_repetitions_point_at_the_block_through_the_depth() -> None:
    source = run(REPEATS).source
    for index, rep in [(1, 0), (2, 1), (3, 2)]:
        pos = source.value(("stages", 0, "blocks", index))
        assert where(pos) == at(REPEATS, "{name: b")
        assert pos.via_label == f"in repetition {rep} of `depth: 3`"
        assert pos.via is not None and where(pos.via) == at(REPEATS, "3, r:")
    name = source.value(("stages", 0, "blocks", 2, "name"))
    assert where(name) == at(REPEATS, "b, op")
    assert name.via_label == "in repetition 1 of `depth: 3`"  # every value of a repetition says which one it is
    assert where(source.value(("stages", 0, "blocks", 6))) == at(REPEATS, "{name: d")  # after the repeats


def test_template_values_point_at_the_template() -> None:
    text = "stages:\n  - for: {i: [0, 1]}\n    name: s${i}\n"
    source = run(text).source
    assert where(source.value(("stages", 1, "name"))) == at(text, "s${i}")


def test_sourcemap_falls_back_to_the_nearest_ancestor_and_has_keys() -> None:
    source = run(REPEATS).source
    assert source.value(("stages", 0, "blocks", 0, "nope", 3)) == source.value(("stages", 0, "blocks", 0))
    assert where(source.key(("stages", 0, "blocks"))) == at(REPEATS, "blocks:")
    assert source.value(()).file == "spec.yaml"


def test_a_variant_named_by_a_number_is_found() -> None:
    """`variant: 5` (YAML reads an integer) chooses the variant written `5:` or `"5":`, as `--variant 5` does."""
    text = "name: n\ninput: {size: [32, 32]}\nvariables: {w: 8}\nvariants: {5: {variables: {w: 16}}}\nvariant: 5\n"
    text += "blocks:\n  - {name: c, op: conv2d, dim_out: '${w}', kernel: 3}\n"
    assert expand("<s>", text=text).data["variables"]["w"] == 16
    assert expand("<s>", text=text.replace("variant: 5", ""), variant="5").data["variables"]["w"] == 16
    with pytest.raises(SpecError, match="`variant:` must be a variant's name, got a list"):
        expand("<s>", text=text.replace("variant: 5", "variant: [5]"))
