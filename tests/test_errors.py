"""One error per mistake: errors that differ only by the copy of a repeated block are reported once, naming the
copies."""

from __future__ import annotations

import time

import pytest

import blockgraph as bg
from blockgraph.errors import MAX_REPORTED, GraphError, Pos, SpecError, copy_names, merge_copies, raise_all
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("names", "shown"),
    [
        (["s1.blocks.0", "s1.blocks.1", "s1.blocks.2"], "s1.blocks.0..2"),
        (["s1.blocks.0.fc2", "s1.blocks.1.fc2"], "s1.blocks.0..1.fc2"),
        (["s1.b.0", "s1.b.2", "s1.b.3", "s2.b.0"], "s1.b.{0,2..3} and s2.b.0"),
        (["stage1.head", "stage2.head"], "stage1.head and stage2.head"),
    ],
)
def test_copy_names(names: list[str], shown: str) -> None:
    assert copy_names(names) == shown


def test_only_copies_at_one_place_merge() -> None:
    here, there = Pos("x.yaml", 3, 5), Pos("x.yaml", 9, 5)
    errors = [
        GraphError("unknown reference 'fc0'", pos=here, node=f"s.blocks.{i}.fc2", hint="did you mean 'fc1'?")
        for i in range(8)
    ]
    errors.append(GraphError("unknown reference 'fc0'", pos=there, node="s.other"))  # another place: its own
    errors.append(SpecError("unknown reference 'fc0'", pos=here, node="s.blocks.9.fc2"))  # another kind: its own
    merged = merge_copies(errors)
    assert [e.node for e in merged] == ["s.blocks.0..7.fc2", "s.other", "s.blocks.9.fc2"]
    assert merged[0].hint == "did you mean 'fc1'?" and merged[0].pos == here


def test_a_misspelled_op_in_a_repeated_block_is_one_error(run_cli, tmp_path) -> None:
    text = (ROOT / "specs" / "swin.yaml").read_text().replace("op: swin_block", "op: swin_blok")
    (tmp_path / "swin.yaml").write_text(text)
    code, _, err = run_cli("validate", tmp_path / "swin.yaml", "--variant", "tiny")
    assert code == 2
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert (
        "in block 'layers0.blocks.0..1 and layers1.blocks.0..1 and layers2.blocks.0..5 and layers3.blocks.0..1'"
        in lines[0]
    )
    assert "unknown op 'swin_blok'" in lines[0] and "in repetition" not in err


def test_a_mistake_in_a_defined_block_used_many_times_is_one_error() -> None:
    spec = """
name: d
input: {channels: 3, size: [32, 32]}
define:
  pair: {params: {dim: null}, blocks: [{name: fc1, op: mlp, dim: "${dim}"}, {name: fc2, op: mlp, dim: 12}]}
blocks:
  - {name: pe, op: conv_patch_embed, dim: 16, patch: 4}
  - {name: blocks, op: pair, dim: 16, depth: 4}
"""
    with pytest.raises(bg.ShapeError) as info:  # shapes are checked in dataflow order: the first copy stops it
        bg.validate(spec)
    assert [e.node for e in info.value.errors] == ["blocks.0.fc2"]
    assert "in block 'pair' used at" in str(info.value)
    typo = spec.replace("op: mlp, dim: 12", "op: mlp, dimm: 16")
    with pytest.raises(bg.SpecError) as info:  # every copy parsed: one error per mistake, naming them
        bg.validate(typo)
    assert [e.message.split(" in block")[0] for e in info.value.errors] == [
        "missing required key 'dim' (op 'mlp')", "unknown key 'dimm'"
    ]  # fmt: skip
    assert [e.node for e in info.value.errors] == ["blocks.0..3.fc2"] * 2
    assert "in block 'pair' used at" in str(info.value) and "repetition" not in str(info.value)


def test_groups_of_errors_are_merged_error_by_error() -> None:
    here = Pos("x.yaml", 3, 5)
    group = bg.errors.MultiError([GraphError("bad", pos=here, node=f"s.b.{i}") for i in range(2)])
    merged = merge_copies([group, GraphError("bad", pos=here, node="s.b.2")])
    assert [e.node for e in merged] == ["s.b.0..2"]


def test_at_most_a_hundred_errors_are_reported_then_how_many_more() -> None:
    with pytest.raises(bg.MultiError) as info:
        raise_all([SpecError(f"problem {i}", pos=Pos("a.yaml", i + 1, 1)) for i in range(1000)])
    errors = info.value.errors
    assert len(errors) == MAX_REPORTED + 1
    assert errors[-1].message == f"900 more error(s) not shown (the first {MAX_REPORTED} are)"
    assert isinstance(errors[-1], SpecError) and errors[-1].file == "a.yaml"


def test_a_spec_with_ninety_thousand_unknown_keys_is_refused_in_seconds(tmp_path, run_cli) -> None:
    """Each unknown key costs a "did you mean" search: only the first ones are searched and reported. The run takes
    a few times what parsing the text alone takes in the same process (2.3-2.5x measured; a search per key would
    be thousands of times), not an absolute time: the suite's machines differ 3x in speed."""
    from blockgraph.spec.load import _compose

    keys = ", ".join(f"k{i}: 1" for i in range(90_000))
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"name: x\nstages:\n  - {{name: s, blocks: [{{name: b, op: linear, dim: 8, dim_out: 8, {keys}}}]}}\n"
    )
    start = time.perf_counter()
    _compose(path.read_text(), str(path))
    parsing = time.perf_counter() - start
    start = time.perf_counter()
    code, _, err = run_cli("validate", path)
    assert code == 2 and time.perf_counter() - start < 6 * parsing + 1
    assert err.count("unknown key") == MAX_REPORTED and "89,900 more error(s) not shown" in err
