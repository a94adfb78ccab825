"""Tests of blockgraph.spec.patch: lists of named items merged by name (through templates, repeats, variants and
chains of `extends:`), the `$` directives, dotted paths (as keys and as overrides), and positions through patches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import blockgraph as bg
from blockgraph.errors import SpecError
from blockgraph.spec.expand import Expanded, expand
from tests.support.positions import at, where

ROOT = Path(__file__).resolve().parents[2]

PARENT = """\
name: family
variables:
  dims: [8, 16, 32]
stages:
  - for: {i: [0, 1, 2]}
    name: stage${i + 1}
    blocks:
      - {name: embed, op: conv_bn, dim_out: "${dims[i]}"}
      - {name: blocks, op: mlp_block, depth: 2, dim: "${dims[i]}"}
      - {name: norm, op: norm, kind: batch}
blocks:
  - {name: pool, op: pool, kind: avg, global: true}
  - {name: head, op: linear, dim_out: 10}
variants:
  wide:
    stages:
      - {name: stage3, blocks: [{name: blocks, dim: 64}]}
"""


HEADER = "extends: family.yaml\n"


def child(tmp_path: Path, text: str, parent: str = PARENT) -> Path:
    (tmp_path / "family.yaml").write_text(parent)
    path = tmp_path / "child.yaml"
    path.write_text(HEADER + text)
    return path


def run(tmp_path: Path, text: str, **kwargs: Any) -> Expanded:
    return expand(child(tmp_path, text), **kwargs)


def fails(tmp_path: Path, text: str, match: str, **kwargs: Any) -> SpecError:
    with pytest.raises(SpecError, match=match) as info:
        run(tmp_path, text, **kwargs)
    return info.value


def names(items: list[dict[str, Any]]) -> list[str]:
    return [item["name"] for item in items]


def stage(out: Expanded, name: str) -> dict[str, Any]:
    return next(s for s in out.data["stages"] if s["name"] == name)


def test_an_item_merges_into_the_inherited_item_of_its_name_through_the_template(tmp_path: Path) -> None:
    out = run(tmp_path, "stages:\n  - name: stage2\n    blocks:\n      - {name: blocks, depth: 3, mlp_ratio: 2}\n")
    assert names(out.data["stages"]) == ["stage1", "stage2", "stage3"]
    two = stage(out, "stage2")["blocks"]
    assert names(two) == ["embed", "blocks.0", "blocks.1", "blocks.2", "norm"]
    assert two[1] == {"name": "blocks.0", "op": "mlp_block", "dim": 16, "mlp_ratio": 2}  # the template's i is bound
    assert names(stage(out, "stage1")["blocks"]) == ["embed", "blocks.0", "blocks.1", "norm"]  # the others as were
    assert "mlp_ratio" not in stage(out, "stage3")["blocks"][1]


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ("{name: extra, op: identity}", ["embed", "blocks.0", "blocks.1", "norm", "extra"]),  # appended
        ("{name: extra, op: identity, $before: norm}", ["embed", "blocks.0", "blocks.1", "extra", "norm"]),
        ("{name: extra, op: identity, $after: embed}", ["embed", "extra", "blocks.0", "blocks.1", "norm"]),
        ("{name: norm, $before: embed}", ["norm", "embed", "blocks.0", "blocks.1"]),  # an inherited item moves
        ("{name: blocks, $delete: true}", ["embed", "norm"]),
        ("{name: norm, $replace: true, op: identity}", ["embed", "blocks.0", "blocks.1", "norm"]),
        ("{$replace: true}\n      - {name: only, op: identity}", ["only"]),  # the whole list replaced
    ],
)
def test_directives(tmp_path: Path, patch: str, expected: list[str]) -> None:
    out = run(tmp_path, f"stages:\n  - name: stage1\n    blocks:\n      - {patch}\n")
    one = stage(out, "stage1")["blocks"]
    assert names(one) == expected
    if "$replace: true, op: identity" in patch:
        assert one[-1] == {"name": "norm", "op": "identity"}  # `kind: batch` not merged in


def test_lists_of_unnamed_items_are_replaced(tmp_path: Path) -> None:
    out = expand(child(tmp_path, "variables: {dims: [1, 2, 4]}\nopts: [{a: 1}]\n", PARENT + "opts: [{a: 2}, {b: 3}]\n"))
    assert out.data["variables"]["dims"] == [1, 2, 4] and out.data["opts"] == [{"a": 1}]


def test_top_level_blocks_new_items_from_a_template_and_a_chain_of_patches(tmp_path: Path) -> None:
    (tmp_path / "family.yaml").write_text(PARENT)
    (tmp_path / "mid.yaml").write_text(
        "extends: family.yaml\nblocks:\n  - for: {k: [1, 2]}\n    name: aux${k}\n    op: identity\n    $before: head\n"
    )
    (tmp_path / "leaf.yaml").write_text("extends: mid.yaml\nblocks:\n  - {name: aux1, $delete: true}\n")
    assert names(expand(tmp_path / "mid.yaml").data["blocks"]) == ["pool", "aux1", "aux2", "head"]
    assert names(expand(tmp_path / "leaf.yaml").data["blocks"]) == ["pool", "aux2", "head"]


def test_a_variant_patches_by_name(tmp_path: Path) -> None:
    out = run(tmp_path, "", variant="wide")
    assert [s["blocks"][1]["dim"] for s in out.data["stages"]] == [8, 16, 64]


@pytest.mark.parametrize(
    "how",
    ["key", "override"],
)
def test_a_dotted_path_reaches_an_item_of_a_template(tmp_path: Path, how: str) -> None:
    if how == "key":
        out = run(tmp_path, "stages.stage3.blocks.blocks.depth: 4\nblocks.head.dim_out: 7\n")
    else:
        overrides = {"stages.stage3.blocks.blocks.depth": 4, "blocks.head.dim_out": 7}
        out = expand(child(tmp_path, ""), overrides=overrides)
    assert names(stage(out, "stage3")["blocks"]) == ["embed", *(f"blocks.{k}" for k in range(4)), "norm"]
    assert names(stage(out, "stage2")["blocks"]) == ["embed", "blocks.0", "blocks.1", "norm"]
    assert out.data["blocks"][1] == {"name": "head", "op": "linear", "dim_out": 7}


def test_a_dotted_path_to_null_deletes(tmp_path: Path) -> None:
    out = expand(child(tmp_path, ""), overrides={"stages.stage1.blocks.norm": None, "blocks.pool.global": None})
    assert names(stage(out, "stage1")["blocks"]) == ["embed", "blocks.0", "blocks.1"]
    assert out.data["blocks"][0] == {"name": "pool", "op": "pool", "kind": "avg"}


@pytest.mark.parametrize(
    ("text", "message", "marker", "hint"),
    [
        ("stages:\n  - name: stage1\n    blocks:\n      - {name: nrom, $delete: true}\n",
         "`stages.stage1.blocks` has no item named 'nrom' to delete", "nrom", "did you mean 'norm'?"),
        ("stages:\n  - name: stage1\n    blocks:\n      - {name: x, op: identity, $before: hed}\n",
         "`\\$before: hed`: `stages.stage1.blocks` has no item named 'hed'", "hed}", "items: embed, blocks, norm"),
        ("stages:\n  - name: stage1\n    blocks:\n      - {name: norm, $delte: true}\n",
         "unknown directive `\\$delte`", "$delte", "did you mean `$delete`?"),
        ("stages:\n  - name: stage1\n    blocks:\n      - {name: norm, $delete: yes, op: x}\n",
         "removes the item; it takes no other keys", "$delete", ""),
        ("stages:\n  - name: stage1\n    blocks:\n      - {name: norm, $replace: false}\n",
         "`\\$replace` takes `true`", "false", ""),
        ("stages:\n  - name: stage1\n    blocks:\n      - {$replace: true, op: x}\n",
         "`- \\$replace: true` alone", "{$replace", ""),
        ("stages.stage9.blocks.norm.kind: group\n",
         "`stages` has no item named 'stage9'", "stages.stage9", "items: stage1, stage2, stage3"),
        ("stages.stage1.blocks.nrom.kind: group\n",
         "`stages.stage1.blocks` has no item named 'nrom'", "stages.stage1", "did you mean 'norm'?"),
        ("variables.dims.x: 1\n", "`variables.dims` is a list of unnamed items", "variables.dims", ""),
        ("name.x: 1\n", "`name` is 'family', not a mapping", "name.x", ""),
    ],
)  # fmt: skip
def test_mistakes_point_at_the_patch(tmp_path: Path, text: str, message: str, marker: str, hint: str) -> None:
    error = fails(tmp_path, text, message)
    assert (error.pos.file, where(error.pos)) == (str(tmp_path / "child.yaml"), at(HEADER + text, marker))
    assert hint in (error.hint or "")


def test_directives_outside_a_patch_are_refused() -> None:
    text = "name: x\nblocks:\n  - {name: a, op: identity, $before: b}\n  - {name: b, op: identity}\n"
    with pytest.raises(SpecError, match="`\\$before` on an item of a list that patches no inherited list") as info:
        expand(None, text=text, file="spec.yaml")  # type: ignore[arg-type]
    assert where(info.value.pos) == at(text, "$before")


def test_positions_through_patches(tmp_path: Path) -> None:
    text = "stages:\n  - name: stage2\n    blocks:\n      - {name: blocks, mlp_ratio: 3}\n"
    out = run(tmp_path, text)
    source, index = out.source, names(out.data["stages"]).index("stage2")
    patched = source.value(("stages", index, "blocks", 1, "mlp_ratio"))
    assert (patched.file, where(patched)) == (str(tmp_path / "child.yaml"), at(HEADER + text, "3}"))
    inherited = source.value(("stages", index, "blocks", 1, "dim"))
    assert (inherited.file, inherited.line) == (str(tmp_path / "family.yaml"), 9)


def test_an_error_of_a_patched_block_points_at_the_child(tmp_path: Path) -> None:
    text = "name: c\nextends: coat_lite_small\nstages:\n  - name: stage2\n    blocks:\n      - {name: blocks, mlp_ratio: -1}\n"
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(bg.SpecError, match="'mlp_ratio' in block 'stage2.blocks.0..3'") as info:
        bg.validate(path)
    assert (info.value.pos.file, where(info.value.pos)) == (str(path), at(text, "-1}"))


@pytest.mark.parametrize(
    ("path", "message", "hint"),
    [("stages.stage1.blokcs.blocks.depth", "unknown key 'blokcs'", "did you mean 'blocks'?"),
     ("stages.stage1.blocks.blocks.mlp_ratoi", "unknown key 'mlp_ratoi' in block 'stage1.blocks.0..2'",
      "did you mean 'mlp_ratio'?")],
)  # fmt: skip
def test_a_path_that_makes_an_unknown_key_is_one_error(path: str, message: str, hint: str) -> None:
    with pytest.raises(bg.SpecError) as info:
        bg.validate("coat_lite_small", overrides={path: 1})
    assert [str(e.pos) for e in info.value.errors] == [f"<override {path}>"]
    assert message in info.value.errors[0].message and hint in (info.value.errors[0].hint or "")


def test_the_readme_example_changes_one_stage(tmp_path: Path) -> None:
    example = ROOT / "specs" / "examples" / "coat_lite_small_deep4.yaml"
    lines = [line for line in example.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) < 8
    changed, base = bg.analyze(example), bg.analyze("coat_lite_small")
    stages = {n.split(".")[0] for n in set(changed.graph.nodes) ^ set(base.graph.nodes)}
    assert stages == {"stage4"}  # stage4's blocks 3-5 are new
    assert bg.validate(example).params > bg.validate("coat_lite_small").params
    same = bg.analyze("coat_lite_small", overrides={"stages.stage4.blocks.blocks.depth": 6})
    assert set(same.graph.nodes) == set(changed.graph.nodes)
