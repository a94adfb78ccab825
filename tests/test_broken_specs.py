"""The broken-spec table: each case edits a valid spec and asserts the exit code (2), the exact FILE:LINE:COL of the
offending value, a distinctive part of the message, a hint, and no traceback."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support.positions import first_at

VALID = """\
name: tiny
input: {channels: 3, size: [64, 64]}
variables: {dim: 32, heads: 4, classes: 10}
stages:
  - name: s1
    shared:
      cpe: {op: conv_pos_enc, dim: 32}
      crpe: {op: conv_rel_pos_enc, dim: 32, heads: 4, windows: {3: 2, 5: 2}}
    blocks:
      - {name: embed, op: conv_patch_embed, dim: "${dim}", patch: 4}
      - {name: cls, op: insert_cls_token, dim: 32}
      - {name: block, op: serial_block, dim: 32, heads: 4, cpe: cpe, crpe: crpe}
blocks:
  - {name: head, op: cls_head, from: s1.block, dim: 32, num_classes: 10}
outputs: {logits: head}
"""

_STAGE_TO_HEAD = VALID[VALID.index("name: s1") : VALID.index(", dim: 32, num_classes")]
"""From the stage's name to the head's reference to it (a case renaming the stage edits both)."""
_SHARED_TO_USE = VALID[VALID.index("cpe: {op") : VALID.index("cpe: cpe") + len("cpe: cpe")]


@dataclass
class Case:
    id: str
    old: str
    new: str
    marker: str
    """Text whose first character is where the error must point (found in the edited spec)."""
    message: str
    hint: str = ""
    args: tuple[str, ...] = ()
    skip: int = 0
    """Point this many characters after the marker's start."""


CASES = [
    Case("unknown op", "op: serial_block", "op: serail_block", "serail_block", "unknown op 'serail_block'",
         "did you mean 'serial_block'"),
    Case("unknown key", "heads: 4, cpe", "headz: 4, cpe", "headz", "unknown key 'headz'", "did you mean 'heads'"),
    Case("wrong type", "patch: 4", "patch: four", "four", r"'patch'.*valid integer.*'four'", "whole number"),
    Case("negative size", "patch: 4", "patch: -4", "-4", r"'patch'.*greater than 0", "positive"),
    Case("crpe splits do not sum to heads", "windows: {3: 2, 5: 2}", "windows: {3: 2, 5: 3}", "{3: 2, 5: 3}",
         r"splits sum to 5 \(2 \+ 3\), but `heads` is 4", "{3: 2, 5: 2}"),
    Case("even crpe window", "windows: {3: 2, 5: 2}", "windows: {3: 2, 4: 2}", "{3: 2, 4: 2}", "window 4 must be odd",
         "3, 5 or 7"),
    Case("dim not divisible by heads", "dim: 32, heads: 4, cpe", "dim: 32, heads: 5, cpe", "5, cpe",
         "dim 32 is not divisible by heads 5", "head counts that divide 32: 1, 2, 4, 8, 16, 32"),
    Case("unknown shared module", "crpe: crpe}", "crpe: crpee}", "crpee}", "unknown shared module 'crpee'",
         "did you mean 'crpe'"),
    Case("shared module of the wrong op", "cpe: cpe,", "cpe: crpe,", "crpe, crpe",
         "'cpe' needs a shared module of op conv_pos_enc, 'crpe' is conv_rel_pos_enc", "conv_pos_enc here: cpe"),
    Case("undefined variable", 'dim: "${dim}"', 'dim: "${dimm}"', "dimm", "undefined variable 'dimm'",
         "did you mean 'dim'"),
    Case("variables in a cycle", "variables: {dim: 32, heads: 4,", 'variables: {dim: "${heads}", heads: "${dim}",',
         '"${heads}"', "variables refer to each other in a cycle: dim -> heads -> dim", "cycle"),
    Case("cycle", "{name: embed, op", "{name: embed, from: block, op", "block, op: conv",
         r"the dataflow has a cycle: s1\.block -> s1\.embed -> s1\.cls -> s1\.block", "runs before it"),
    Case("duplicate node name", "{name: cls, op", "{name: embed, op", "embed, op: insert",
         "duplicate node name 's1.embed' \\(first defined at .*:10:", "own `name:`"),
    Case("unknown reference", "from: s1.block", "from: s1.blok", "s1.blok", "unknown reference 's1.blok'",
         "did you mean 's1.block'"),
    Case("bad YAML syntax", "size: [64, 64]}", "size: [64, 64}", "}", "YAML syntax: expected ',' or ']'",
         "indentation"),
    Case("duplicate key", "name: tiny\n", "name: tiny\nname: tiny2\n", "name: tiny2", "duplicate key 'name'",
         "already set at line 1"),
    Case("python tag", "name: tiny\n", "name: !!python/object/apply:os.system [echo hi]\n", "!!python",
         "tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed", "plain data"),
    Case("channel mismatch between blocks", "op: insert_cls_token, dim: 32", "op: insert_cls_token, dim: 48", "48}",
         "input has 32 channels but `dim` is 48", "set `dim: 32`"),
    Case("missing required key", ", num_classes: 10}", "}", "{name: head",
         "missing required key 'num_classes' \\(op 'cls_head'\\)", "add `num_classes: ...`"),
    Case("token pooling without a cls token", "from: s1.block", "from: s1.embed", "cls_head",
         "`pool: token` needs a cls token", "pool: avg"),
    Case("input too small for the network", "", "", "patch: 4", r"input 2x64: .*smaller than the kernel window 4",
         "this model accepts any H, W >= 4; nearest: H = 4", args=("--input", "3x2x64"), skip=7),
    Case("input with the wrong channel count", "", "", "channels: 3", "the input has 1 channels, the model takes 3",
         "3x64x64", args=("--input", "1x64x64"), skip=10),
    Case("unknown variant", "name: tiny\n", "name: tiny\nvariant: big\n", "big",
         "variant 'big' asked for, but this spec declares no `variants:`", "remove `variant:`"),
    Case("missing extends file", "name: tiny\n", "name: tiny\nextends: nope.yaml\n", "nope.yaml",
         "`extends:` names a file that does not exist: .*nope.yaml", "chain"),
    Case("index out of range in an expression", 'dim: "${dim}"', 'dim: "${[32, 64][2]}"', "[2]",
         "index 2 out of range for a list of 2 items", "", skip=1),
    Case("bad output reference", "outputs: {logits: head}", "outputs: {logits: heda}", "heda",
         "unknown reference 'heda'", "did you mean 'head'"),
    Case("depth past the expansion limit", "op: serial_block, dim: 32,", "op: serial_block, depth: 10000000, dim: 32,",
         "10000000", "`depth` 10,000,000 would expand the spec past the limit of 10,000 entries", "at most 10,000"),
    Case("alias bomb", "variables: {dim: 32, heads: 4, classes: 10}",
         "variables: {dim: 32, heads: 4, classes: 10, a: &a [1, 1, 1, 1, 1, 1, 1, 1], b: &b [*a, *a, *a, *a, *a, *a, "
         "*a, *a], c: &c [*b, *b, *b, *b, *b, *b, *b, *b], d: &d [*c, *c, *c, *c, *c, *c, *c, *c], e: &e [*d, *d, *d, "
         "*d, *d, *d, *d, *d], f: [*e, *e, *e, *e, *e, *e, *e, *e]}", "f: [*e", "the spec expands to more than 200,000 "
         "values", "aliases of aliases grows exponentially", skip=20),  # at the fifth *e, which crosses the limit
    Case("a keyword as a block name", "{name: cls, op", "{name: class, op", "class, op",
         "the name 's1.class' cannot be a module: 'class' is a Python keyword", "rename it"),
    Case("an nn.Module attribute as a block name", "{name: cls, op", "{name: forward, op", "forward, op",
         r"the name 's1.forward' cannot be a module: 'forward' is an attribute of every torch module", "rename it"),
    Case("a model attribute as a top-level name", "  - {name: head, op: cls_head, from: s1.block",
         "  - {name: spec, op: cls_head, from: s1.block, dim: 32, num_classes: 10}\n  - {name: head, op: cls_head, "
         "from: s1.block", "spec, op", r"'spec' is an attribute of the compiled model \(model.spec\)", "rename it"),
    Case("a keyword as a stage name", _STAGE_TO_HEAD, _STAGE_TO_HEAD.replace("s1", "'None'", 1).replace("s1", "None"),
         "'None'",
         "the name 'None' cannot be a module: 'None' is a Python keyword", "rename it"),
    Case("an nn.Module attribute as a shared name", _SHARED_TO_USE, _SHARED_TO_USE.replace("cpe: {", "to: {")
         .replace("cpe: cpe", "cpe: to"), "{op: conv_pos_enc",
         r"the name 's1.to' cannot be a module: 'to' is an attribute of every torch module", "rename it"),
    Case("a dunder as a block name", "{name: cls, op", "{name: __class__, op", "__class__, op",
         "'__class__' starts with '__'", "rename it"),
    Case("a numbered name that is not a repetition", "{name: cls, op", "{name: cls.1, op", "cls.1, op",
         r"numbered modules count from s1.cls.0 without gaps; found s1.cls.1", "depth:"),
    Case("a block and a stage of one name", "  - {name: head, op: cls_head, from: s1.block",
         "  - {name: s1, op: cls_head, from: s1.block, dim: 32, num_classes: 10}\n  - {name: head, op: cls_head, "
         "from: s1.block", "s1, op", "'s1' names a module and also the namespace of 's1.cpe'", "rename one"),
    Case("a reference that is not text", "from: s1.block", "from: 5", "5, dim",
         r"'from' in block 'head' \(cls_head\): input should be a valid string \(got 5\)", "write text"),
    Case("an infinite float", "heads: 4, cpe", "heads: 4, mlp_ratio: .inf, cpe", ".inf",
         r"'mlp_ratio' in block 's1.block' \(serial_block\): input should be a finite number \(got inf\)", "finite"),
    Case("not a number", "heads: 4, cpe", "heads: 4, mlp_ratio: .nan, cpe", ".nan", r"finite number \(got nan\)", "finite"),
    Case("an input size past the limit", "size: [64, 64]", "size: [1000000000000000000, 64]", "1000000000000000000",
         r"item 0: input should be less than or equal to 1000000", "smaller"),
    Case("over the parameter budget", "", "", "{name: block", "would have 15,658 parameters, over the limit of "
         "10,000; the largest node has 12,704", "next largest: s1.embed", args=("--max-params", "1e4")),
    Case("over the activation budget", "", "", "{name: cls", "would hold 0.8 MiB of activations for a batch of 8 at "
         "64x64, over the limit of 0.5 MiB; the largest output is this node's", "smaller input or batch",
         args=("--max-activation-bytes", "524288", "--batch", "8")),
]  # fmt: skip


def test_the_base_spec_is_valid(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(VALID)
    code, out, err = run_cli("validate", path)
    assert code == 0, err
    assert "accepts: any H, W >= 4" in out


def test_the_table_is_large_enough() -> None:
    assert len(TABLE) >= 40


# A small co-scale model: three scales of width 32 into two parallel blocks and an aggregate head.
PARALLEL = """\
name: coscale
input: {channels: 3, size: [64, 64]}
variables: {d: [32, 32, 32]}
stages:
  - for: {i: [0, 1, 2]}
    name: s${i}
    shared:
      cpe: {op: conv_pos_enc, dim: "${d[i]}"}
      crpe: {op: conv_rel_pos_enc, dim: "${d[i]}", heads: 4, windows: {3: 4}}
    blocks:
      - {name: embed, op: conv_patch_embed, dim: "${d[i]}", patch: "${4 if i == 0 else 2}"}
      - {name: cls, op: insert_cls_token, dim: "${d[i]}"}
      - {name: block, op: serial_block, dim: "${d[i]}", heads: 4, cpe: cpe, crpe: crpe}
      - {if: "${i < 2}", name: map, op: tokens_to_map, drop_extra: true}
blocks:
  - name: par
    op: coat_parallel_block
    depth: 2
    from: [s0.block, s1.block, s2.block]
    dim: 32
    heads: 4
    mlp_ratios: [4, 4, 4]
    cpes: [s0.cpe, s1.cpe, s2.cpe]
    crpes: [s0.crpe, s1.crpe, s2.crpe]
  - {name: head, op: aggregate_head, from: [par.x2, par.x3, par.x4], dim: 32, num_classes: 10}
outputs: {logits: head}
"""

PARALLEL_CASES = [
    Case("parallel block fed scales of different dims", "variables: {d: [32, 32, 32]}",
         "variables: {d: [32, 32, 48]}", "[s0.block", "the scales have different widths \\(x2 32, x3 32, x4 48",
         "give them one width"),
    Case("output port that does not exist", "par.x3, par.x4]", "par.x3, par.x5]", "par.x5",
         "'par.1' has no output port 'x5'", "ports of 'par.1': x2, x3, x4"),
    Case("shared MLP given two different hidden sizes", "mlp_ratios: [4, 4, 4]", "mlp_ratios: [4, 4, 2]",
         "[4, 4, 2]", "the scales share one MLP, but mlp_ratios give hidden sizes 128, 128, 64",
         "same ratio"),
    Case("a multi-output block read without a port", "from: [par.x2, par.x3, par.x4]", "from: [par, par.x3, par.x4]",
         "par, par.x3", "'par.1' has several outputs; name one of them", "from: par.x2"),
    Case("one CPE for three scales", "cpes: [s0.cpe, s1.cpe, s2.cpe]", "cpes: [s0.cpe]", "[s0.cpe]",
         "`cpes` names 1 module for 3 scales", "one shared conv_pos_enc per scale"),
]  # fmt: skip


def test_the_parallel_base_spec_is_valid(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "coscale.yaml"
    path.write_text(PARALLEL)
    code, out, err = run_cli("validate", path)
    assert code == 0, err
    # timm-style resizing needs the scales' grids (strides 4, 8, 16) to be exact multiples of each other
    assert "accepts: H in {16k, 16k+1, 16k+2, 16k+3}, H >= 16; W in {16k, 16k+1, 16k+2, 16k+3}, W >= 16" in out
    assert "warning" not in err


MPVIT = (ROOT / "specs" / "mpvit.yaml").read_text()

MPVIT_CASES = [
    Case("path count list shorter than the stage list", "paths: [2, 3, 3, 3]", "paths: [2, 3, 3]",
         "i]}\n        stride", r"index 3 out of range for a list of 3 items \(valid: 0..2"),
    Case("path encoder with a mismatched width", "            dim: ${dims[i]}\n            heads",
         "            dim: ${dims[i] + 8}\n            heads", "${dims[i] + 8}",
         "input has 64 channels but `dim` is 72", "set `dim: 64`"),
    Case("merge fed maps of different sizes", "from: patch_embed.p0,",
         "from: \"${'stem.conv' if i == 0 else 'stage' + str(i) + '.aggregate'}\",", "concat_conv_bn",
         r"cannot concatenate maps of different sizes \(\(H \+ 3\)//4 x \(W \+ 3\)//4, \(H \+ 7\)//8",
         "keep one map size"),
    Case("a path reading a multi-output embedding by default",
         '          - {name: tokens, op: map_to_tokens, from: "patch_embed.p${k}"}\n', "", "name: layers",
         "op 'serial_block' takes 1 input, the previous block gives 2",
         "'stage1.patch_embed' has several outputs (stage1.patch_embed.p0, stage1.patch_embed.p1): read one"),
]  # fmt: skip


SWIN = (ROOT / "specs" / "swin.yaml").read_text()
MOBILEVIT = (ROOT / "specs" / "mobilevit.yaml").read_text()
DEFORMABLE = (ROOT / "specs" / "deformable_encoder.yaml").read_text()

FAMILY_CASES = [
    (SWIN, Case("swin shift as large as the window", "shift: ${pick(window, i) // 2 if", "shift: ${pick(window, i) if",
                "${pick(window, i) if", "shift 7 must be smaller than the window 7", "`shift: 3`")),
    (SWIN, Case("swin heads that do not divide the width", "heads: [3, 6, 12, 24]", "heads: [3, 5, 12, 24]",
                "${heads[i]}", "dim 192 is not divisible by heads 5", "head counts that divide 192")),
    (SWIN, Case("swin input its windows do not divide", "size: [224, 224]", "size: [256, 256]", "${pick(window, i)}\n",
                "the map height \\(H//4\\) is not divisible by the window 7", "H in {224k")),
    (MOBILEVIT, Case("mobilevit transformer width not divisible by heads", "tdims: [144, 192, 240]",
                     "tdims: [144, 190, 240]", "4\n        patch", "transformer_dim 190 is not divisible by heads 4",
                     "1, 2, 5, 10, 19, 38")),
    (MOBILEVIT, Case("mobilevit feature with a wrong stride", "stage1: {from: stage1.ir, stride: 4}",
                     "stage1: {from: stage1.ir, stride: 8}", "8}", "declares stride 8, but 'stage1.ir.2' has stride 4",
                     "`stride: 4`")),
    (DEFORMABLE, Case("deformable encoder fed fewer levels than declared", "levels: 4", "levels: 3",
                      "[input_proj0", "4 inputs for `levels: 3`", "`levels: 4`")),
    (DEFORMABLE, Case("group norm groups that do not divide the width", "d_model: 256", "d_model: 250",
                      "conv_gn", "dim_out 250 is not divisible by groups 32", "1, 2, 5, 10, 25, 50")),
    (DEFORMABLE, Case("a level reference through a missing repetition", "from: backbone.stage.4\n    dim_out",
                      "from: backbone.stage.9\n    dim_out", "backbone.stage.9",
                      "unknown reference 'backbone.stage.9': 'backbone.stage' has 5 repetitions \\(0..4\\)",
                      "did you mean 'backbone.stage.4'")),
]  # fmt: skip

DEFINED = """\
name: defined
input: {channels: 3, size: [64, 64]}
define:
  mlp_pair:
    params: {dim: null, ratio: 2}
    blocks:
      - {name: fc1, op: mlp, dim: "${dim}", mlp_ratio: "${ratio}"}
      - {name: fc2, op: mlp, dim: "${dim}", dim_out: "${dim}"}
stages:
  - name: s1
    blocks:
      - {name: embed, op: conv_patch_embed, dim: 32, patch: 4}
      - {name: blocks, op: mlp_pair, dim: 32, depth: 2}
blocks:
  - {name: head, op: cls_head, from: s1.blocks, dim: 32, num_classes: 10, pool: avg}
outputs: {logits: head}
"""

DEFINED_CASES = [
    Case("defined block: a wrong dim inside", 'dim: "${dim}", dim_out', "dim: 16, dim_out", "16, dim_out",
         "node 's1.blocks.0.fc2': input has 32 channels but `dim` is 16", "`dim: 32`"),
    Case("defined block: an unknown parameter", "dim: 32, depth", "dims: 32, depth", "dims",
         "block 'mlp_pair' has no parameter 'dims'", "did you mean 'dim'"),
    Case("defined block: a required parameter missing", "dim: 32, depth: 2", "depth: 2", "{name: blocks",
         "block 'mlp_pair' needs parameter dim", "`dim: ...`"),
    Case("defined block: an unknown key inside", 'mlp_ratio: "${ratio}"', 'mlp_raito: "${ratio}"', "mlp_raito",
         "unknown key 'mlp_raito' in block 's1.blocks.0..1.fc1' \\(mlp\\)", "did you mean 'mlp_ratio'"),
    Case("defined block: uses itself", "fc2, op: mlp,", "fc2, op: mlp_pair,", "mlp_pair,",
         "defined block 'mlp_pair' uses itself: mlp_pair -> mlp_pair", "not itself"),
    Case("defined block: an output that is not one of its blocks", "ratio: 2}", "ratio: 2}\n    output: fc3", "fc3",
         "the output of block 'mlp_pair' names 'fc3'", "its blocks: fc1, fc2"),
    Case("defined block: a misspelled use", "op: mlp_pair, dim: 32", "op: mlp_piar, dim: 32", "mlp_piar",
         "unknown op 'mlp_piar'", "did you mean 'mlp_pair'"),
    Case("defined block: the name of a registered op", "  mlp_pair:", "  mlp:", "mlp:",
         "defined block 'mlp' has the name of a registered op", "rename it"),
    Case("defined block: a spec variable inside", 'mlp_ratio: "${ratio}"', 'mlp_ratio: "${width}"', "width",
         "undefined variable 'width'", "ratio"),
]  # fmt: skip

PATCHES = """\
name: patches
input: {channels: 3, size: [64, 64]}
define:
  patchify:
    params: {p: 4}
    blocks:
      - {name: split, op: rearrange, pattern: b c (h p1) (w p2) -> b (h w) (p1 p2 c), axes: {p1: "${p}", p2: "${p}"}}
blocks:
  - {name: patches, op: patchify, p: 4}
  - {name: head, op: cls_head, dim: 48, num_classes: 10, pool: avg}
outputs: {logits: head}
"""

PATCHES_CASES = [
    Case("defined block: an einops axis that does not divide", "size: [64, 64]", "size: [66, 64]",
         "b c (h p1)", "node 'patches.split': input 66x64: axis 'h' of \\(h p1\\): H is not divisible by p1=4",
         "nearest: H = 64 or 68"),
    Case("defined block: an einops axis not in the pattern", 'p2: "${p}"}', 'p3: "${p}"}', "b c (h p1)",
         "p3", "axes"),
]  # fmt: skip

TABLE = (
    [(VALID, c) for c in CASES]
    + [(DEFINED, c) for c in DEFINED_CASES]
    + [(PATCHES, c) for c in PATCHES_CASES]
    + [(PARALLEL, c) for c in PARALLEL_CASES]
    + [(MPVIT, c) for c in MPVIT_CASES]
    + FAMILY_CASES
)


@pytest.mark.parametrize(("base", "case"), TABLE, ids=[c.id for _, c in TABLE])
def test_broken_spec(base: str, case: Case, tmp_path: Path, run_cli) -> None:
    assert case.old in base, f"case {case.id!r} edits text the valid spec does not have"
    text = base.replace(case.old, case.new, 1)
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    code, out, err = run_cli("validate", path, *case.args)
    assert code == 2, (out, err)
    assert "Traceback" not in err and "internal error" not in err
    line, column = first_at(text, case.marker, case.skip)
    first = err.splitlines()[0]
    assert first.startswith(f"{path}:{line}:{column}: error: "), f"{first!r} should point at {line}:{column}"
    assert re.search(case.message, first), first
    hints = [x for x in err.splitlines() if x.startswith("hint: ")]
    assert hints, err  # every error says how to fix it
    assert case.hint in hints[0], err
