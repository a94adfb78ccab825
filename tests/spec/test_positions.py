"""An error points at the value that is wrong, and says where it came from: the repetition and the variable."""

from __future__ import annotations

from pathlib import Path

from tests.support.positions import at

SPEC = """\
name: rep
input: {channels: 3, size: [64, 64]}
variables: {dims: [32, 32, 48]}
stages:
  - name: s
    shared:
      cpe: {op: conv_pos_enc, dim: 32}
      crpe: {op: conv_rel_pos_enc, dim: 32, heads: 4, windows: {3: 4}}
    blocks:
      - {name: embed, op: conv_patch_embed, dim: 32, patch: 4}
      - {name: cls, op: insert_cls_token, dim: 32}
      - name: block
        op: serial_block
        depth: 3
        dim: ${dims[rep]}
        heads: 4
        cpe: cpe
        crpe: crpe
blocks:
  - {name: head, op: cls_head, from: s.block, dim: 32, num_classes: 10}
outputs: {logits: head}
"""


def test_an_error_in_a_repetition_names_the_use_the_repetition_and_the_variable(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "rep.yaml"
    path.write_text(SPEC)
    code, _, err = run_cli("validate", path)
    assert code == 2
    lines = err.splitlines()
    use, depth, definition = at(SPEC, "${dims[rep]}"), at(SPEC, "3\n        dim"), at(SPEC, "[32, 32, 48]")
    assert lines[0].startswith(f"{path}:{use[0]}:{use[1]}: error: node 's.block.2': input has 32 channels")
    assert lines[1] == f"  in repetition 2 of `depth: 3` at {path}:{depth[0]}:{depth[1]}"
    assert lines[2] == f"  variable 'dims' defined at {path}:{definition[0]}:{definition[1]}"
