"""The einops ops (rearrange, reduce, repeat): static shapes equal real ones, the accepted sizes follow from the
pattern's splits, bad patterns are errors at the pattern, and the modules are einops' own and compile."""

from __future__ import annotations

import copy
import pickle
import re
import subprocess
import sys

import pytest
import torch
from einops.layers.torch import Rearrange, Reduce

import blockgraph as bg
from blockgraph.compiler.check import check_blocks
from blockgraph.layers.einops import EinopsOnGrid
from tests.conftest import ROOT

TO_TOKENS = "{name: tokens, op: map_to_tokens}"
PATCHIFY = "{name: patchify, op: rearrange, pattern: 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', axes: {p1: 4, p2: 4}}"


def spec(*blocks: str, channels: int = 3, size: tuple[int, int] = (32, 48)) -> str:
    """A model of ``blocks`` (YAML flow mappings), the last one named ``out``."""
    lines = "\n".join(f"  - {b}" for b in blocks)
    return f"name: m\ninput: {{channels: {channels}, size: [{size[0]}, {size[1]}]}}\nblocks:\n{lines}\n"


def out(block: str) -> str:
    """``block`` named ``out``."""
    return "{name: out, " + re.sub(r"^\{(name: \w+, )?", "", block)


# (id, blocks before, the einops block, static type of its output, input sizes (H, W) to compare at)
SHAPES = [
    ("patchify", [], PATCHIFY, "tokens[(H//4)*(W//4), 48]", [(32, 48), (16, 64)]),
    (
        "unpatchify",
        [PATCHIFY],
        "{op: rearrange, pattern: 'b (h w) (p1 p2 c) -> b c (h p1) (w p2)', axes: {p1: 4, p2: 4}}",
        "image[3, 4*(H//4), 4*(W//4)]",
        [(32, 48), (16, 64)],
    ),
    ("map to tokens", [], "{op: rearrange, pattern: 'b c h w -> b (h w) c'}", "tokens[H*W, 3]", [(8, 12), (5, 7)]),
    (
        "tokens to map",
        [TO_TOKENS],
        "{op: rearrange, pattern: 'b (h w) c -> b c h w'}",
        "image[3, H, W]",
        [(8, 12), (5, 7)],
    ),
    ("transpose", [], "{op: rearrange, pattern: 'b c h w -> b c w h'}", "image[3, W, H]", [(8, 12), (5, 7)]),
    ("global mean", [], "{op: reduce, pattern: 'b c h w -> b c', reduction: mean}", "vector[3]", [(8, 12), (5, 7)]),
    (
        "2x2 max pool",
        [],
        "{op: reduce, pattern: 'b c (h 2) (w 2) -> b c h w', reduction: max}",
        "image[3, H//2, W//2]",
        [(8, 12), (6, 4)],
    ),
    (
        "repeat channels",
        [],
        "{op: repeat, pattern: 'b c h w -> b (c r) h w', axes: {r: 2}}",
        "image[6, H, W]",
        [(8, 12), (5, 7)],
    ),
    ("repeat numbered", [], "{op: repeat, pattern: 'b c h w -> b (c 2) h w'}", "image[6, H, W]", [(8, 12), (5, 7)]),
    (
        "pool to tokens",
        [],
        "{op: reduce, pattern: 'b c (h 2) (w 2) -> b (h w) c', reduction: mean}",
        "tokens[(H//2)*(W//2), 3]",
        [(8, 12), (6, 4)],
    ),
    (
        "reduce a grid axis",
        [TO_TOKENS],
        "{op: reduce, pattern: 'b (h w) c -> b h c', reduction: sum}",
        "tokens[H*1, 3]",
        [(8, 12), (5, 7)],
    ),
    (
        "vector to map",
        ["{op: reduce, pattern: 'b c h w -> b c', reduction: mean}"],
        "{op: rearrange, pattern: 'b c -> b c 1 ()'}",
        "image[3, 1, 1]",
        [(8, 12)],
    ),
    (
        "repeat tokens",
        [TO_TOKENS],
        "{op: repeat, pattern: 'b n c -> b (n r) c', axes: {r: 2}}",
        "tokens[H*(2*W), 3]",
        [(8, 12), (5, 7)],
    ),
    (
        "cls tokens pass whole",
        [TO_TOKENS, "{op: insert_cls_token, dim: 3}"],
        "{op: rearrange, pattern: 'b n (g c) -> b n (c g)', axes: {g: 3}}",
        "tokens[1 + H*W, 3]",
        [(8, 12), (5, 7)],
    ),
    (
        "split channels",
        [],
        "{op: rearrange, pattern: 'b (g c) h w -> b (h w) (c g)', axes: {g: 3}}",
        "tokens[H*W, 3]",
        [(4, 6)],
    ),
]


@pytest.mark.parametrize(("before", "block", "static", "sizes"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_static_shapes_equal_real_shapes(before: list[str], block: str, static: str, sizes: list) -> None:
    text = spec(*before, out(block), size=sizes[0])
    analysis = bg.analyze(text)
    assert str(analysis.inference.types["out"]) == static
    assert check_blocks(analysis.inference) == len(before) + 1  # shape rule == module on meta, params == 0
    torch.manual_seed(0)
    model = bg.build_model(analysis).eval()
    for h, w in sizes:
        with torch.no_grad():
            y = model(torch.randn(2, 3, h, w))
        assert tuple(y.shape) == analysis.inference.shape("out", h, w, batch=2), (h, w)


@pytest.mark.parametrize(
    ("block", "module"),
    [
        (PATCHIFY, Rearrange),
        ("{op: reduce, pattern: 'b c (h 2) (w 2) -> b c h w', reduction: max}", Reduce),
        ("{op: repeat, pattern: 'b c h w -> b (c r) h w', axes: {r: 2}}", Reduce),  # einops.repeat is reduce "repeat"
    ],
)
def test_constant_lengths_build_einops_own_layers(block: str, module: type) -> None:
    model = bg.build_model(spec(out(block)))
    assert type(model.out).__mro__[1] is module  # einops' own layer (an fx-recordable subclass)
    assert model.out.axes_lengths == dict(model.spec.blocks[0].axes)
    assert "out(image)" in model.code  # no grid passed


def test_grid_lengths_pass_the_token_grid() -> None:
    model = bg.build_model(spec(PATCHIFY, out("{op: rearrange, pattern: 'b (h w) c -> b c h w'}")))
    assert type(model.out) is EinopsOnGrid and model.out.grid_axes == {"h": 0}
    assert "self.out(patchify, size_1)" in model.code and "size_1 = (H//4, W//4)" in model.code
    assert repr(model.out) == "EinopsOnGrid('b (h w) c -> b c h w', 'rearrange', h=grid[0])"


def test_a_constant_grid_size_is_a_length_of_the_layer() -> None:
    """Tokens whose grid has a constant number of rows: the module is einops' layer, built with that length."""
    model = bg.build_model(
        spec(
            "{op: reduce, pattern: 'b c h w -> b c 1 w', reduction: mean}",
            "{op: repeat, pattern: 'b c () w -> b c r w', axes: {r: 4}}",
            "{op: rearrange, pattern: 'b c h w -> b (h w) c'}",
            out("{op: rearrange, pattern: 'b (h w) c -> b c h w'}"),
        )
    )
    assert str(model.node_types()["out"]) == "image[3, 4, W]"
    assert isinstance(model.out, Rearrange) and model.out.axes_lengths == {"h": 4}
    assert tuple(model(torch.randn(1, 3, 8, 12)).shape) == (1, 3, 4, 12)


def test_accepted_sizes_follow_the_splits() -> None:
    text = spec(
        "{op: reduce, pattern: 'b c (h 4) (w 4) -> b c h w', reduction: mean}",
        out("{op: rearrange, pattern: 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', axes: {p1: 2, p2: 2}}"),
        size=(64, 64),
    )
    assert bg.validate(text).accepted == ["H % 8 == 0", "W % 8 == 0"]
    with pytest.raises(bg.ShapeError, match=r"axis 'h' of \(h p1\): H//4 is not divisible by p1=2") as e:
        bg.validate(text, input_size=(36, 64))
    assert "this model accepts H % 8 == 0; W % 8 == 0" in e.value.hint and "nearest: H = 32 or 40" in e.value.hint
    line = text.splitlines()[e.value.line - 1]
    assert line[e.value.column - 1 :].startswith("'b c (h p1)")  # at the pattern
    assert bg.validate(text, input_size=(40, 16)).input == (3, 40, 16)


def test_grid_lengths_given_in_axes_are_required_of_the_grid() -> None:
    text = spec(PATCHIFY, out("{op: rearrange, pattern: 'b (h w) c -> b c h w', axes: {h: 8}}"))
    assert bg.validate(text).accepted == ["H == 32", "W % 4 == 0"]
    with pytest.raises(
        bg.ShapeError, match=r"axis 'h' of \(h w\) is the token grid's height H//4, but `axes` gives h=8"
    ):
        bg.validate(text, input_size=(64, 48))
    model = bg.build_model(text)
    assert isinstance(model.out, Rearrange) and tuple(model(torch.randn(1, 3, 32, 48)).shape) == (1, 48, 8, 12)


BAD = [
    (
        "syntax",
        "{op: rearrange, pattern: 'b c (h w -> b c h w'}",
        bg.SpecError,
        r"bad pattern .*: Imbalanced parentheses",
    ),
    ("no arrow", "{op: rearrange, pattern: 'b c h w'}", bg.SpecError, r"needs one `->` between its sides"),
    ("nested", "{op: rearrange, pattern: 'b c ((h) w) -> b c h w'}", bg.SpecError, r"one-level"),
    (
        "unknown axis on the right",
        "{op: rearrange, pattern: 'b c h w -> b c h x'}",
        bg.SpecError,
        r"axis 'x' of the right side is not on the left",
    ),
    (
        "axis dropped",
        "{op: rearrange, pattern: 'b c h w -> b c h'}",
        bg.SpecError,
        r"axis 'w' of the left side is missing on the right: rearrange keeps",
    ),
    ("axis used twice", "{op: rearrange, pattern: 'b c h h -> b c h'}", bg.SpecError, r'duplicate dimension "h"'),
    ("batch moved", "{op: rearrange, pattern: 'b c h w -> c b h w'}", bg.SpecError, r"the first axis is the batch"),
    ("batch merged", "{op: rearrange, pattern: 'b c h w -> (b c) h w'}", bg.SpecError, r"the first axis is the batch"),
    (
        "batch reduced",
        "{op: reduce, pattern: 'b c h w -> c', reduction: sum}",
        bg.SpecError,
        r"the first axis is the batch",
    ),
    (
        "batch length",
        "{op: rearrange, pattern: 'b c h w -> b c h w', axes: {b: 2}}",
        bg.SpecError,
        r"the batch axis 'b' takes any length",
    ),
    ("ellipsis", "{op: rearrange, pattern: 'b ... -> b ...'}", bg.SpecError, r"ellipsis"),
    (
        "number in rearrange",
        "{op: rearrange, pattern: 'b c (h 2) w -> b c h (w 2)'}",
        bg.SpecError,
        r"rearrange takes no numbered axes but 1",
    ),
    (
        "new axis in reduce",
        "{op: reduce, pattern: 'b c h w -> b c x', reduction: max}",
        bg.SpecError,
        r"reduce cannot make new axes",
    ),
    (
        "repeat without length",
        "{op: repeat, pattern: 'b c h w -> b (c r) h w'}",
        bg.SpecError,
        r"new axis 'r' has no length",
    ),
    (
        "unused length",
        "{op: rearrange, pattern: 'b c h w -> b c w h', axes: {q: 2}}",
        bg.SpecError,
        r"axis 'q' of `axes:` is not in the pattern",
    ),
    ("discouraged name", "{op: rearrange, pattern: 'b c h axis -> b c axis h'}", bg.SpecError, r"bad pattern"),
    (
        "5-d output",
        "{op: rearrange, pattern: 'b c (h p) w -> b c h p w', axes: {p: 2}}",
        bg.ShapeError,
        r"the output would have 5 dims, \[B, 3, H//2, 2, W\]",
    ),
    (
        "symbolic channels",
        "{op: rearrange, pattern: 'b c h w -> b (c h) w'}",
        bg.ShapeError,
        r"the output's channels would be W: they depend on the input size",
    ),
    (
        "product map size",
        "{op: rearrange, pattern: 'b c h w -> b c (h w) 1'}",
        bg.ShapeError,
        r"the output map's height would be H\*W",
    ),
    (
        "two unknowns in a group",
        "{op: rearrange, pattern: 'b c (h p) w -> b (c p) h w'}",
        bg.ShapeError,
        r"\(h p\) has 2 axes of unknown length \('h', 'p'\)",
    ),
    (
        "wrong rank",
        "{op: rearrange, pattern: 'b c h -> b h c'}",
        bg.ShapeError,
        r"left side `b c h` has 3 dims, the input image\[3, H, W\] has 4",
    ),
    (
        "constant never divides",
        "{op: rearrange, pattern: 'b (g c) h w -> b (c g) h w', axes: {g: 2}}",
        bg.ShapeError,
        r"axis 'c' of \(g c\): 3 is not divisible by g=2",
    ),
    (
        "fixed length differs",
        "{op: reduce, pattern: 'b c h 4 -> b c h 1', reduction: max}",
        bg.ShapeError,
        r"input 32x48: the input's dim W must be 4 \(W == 4 does not hold",
    ),
]


@pytest.mark.parametrize(("block", "error", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_patterns_are_errors_at_the_pattern(block: str, error: type, match: str) -> None:
    text = spec(out(block))
    with pytest.raises(error, match=match) as e:
        bg.validate(text)
    assert type(e.value) is error and e.value.hint and e.value.node == "out"
    line = text.splitlines()[e.value.line - 1]
    assert line[e.value.column - 1 :].startswith(block.split("pattern: ")[1][:4]), (line, e.value.column)


@pytest.mark.parametrize(
    ("before", "block", "match", "hint"),
    [
        (
            [TO_TOKENS, "{op: insert_cls_token, dim: 3}"],
            "{op: rearrange, pattern: 'b (h w) c -> b c h w'}",
            r"carry 1 extra token",
            "remove_cls_token",
        ),
        (
            [TO_TOKENS],
            "{op: rearrange, pattern: 'b (h w p) c -> b (h w) (p c)', axes: {p: 2}}",
            r"\(h w p\) cannot split the token count H\*W",
            "(h w)",
        ),
        ([TO_TOKENS], "{op: rearrange, pattern: 'b n c -> b c n'}", r"the output's channels would be H\*W", "constant"),
    ],
)
def test_token_counts_bind_whole_or_as_the_grid(before: list[str], block: str, match: str, hint: str) -> None:
    with pytest.raises(bg.ShapeError, match=match) as e:
        bg.validate(spec(*before, out(block)))
    assert hint in e.value.hint


def test_compiled_fullgraph_equals_eager() -> None:
    """Both module kinds (einops' layer; the grid-reading one) compile into one graph, at static and dynamic sizes."""
    text = spec(
        PATCHIFY,
        "{name: dup, op: repeat, pattern: 'b n c -> b n (c r)', axes: {r: 2}}",
        "{name: unpatchify, op: rearrange, pattern: 'b (h w) c -> b c h w'}",
        "{name: pool, op: reduce, pattern: 'b c (h 2) (w 2) -> b c h w', reduction: max}",
    )
    torch.manual_seed(0)
    model = bg.build_model(text).eval()
    assert type(model.unpatchify) is EinopsOnGrid
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        eager = model(x)
        for dynamic in (False, True):
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
            assert torch.equal(compiled(x), eager)
            other = torch.randn(1, 3, 16, 64)
            assert torch.equal(compiled(other), model(other))
    torch._dynamo.reset()


def test_models_with_einops_ops_pickle_and_copy() -> None:
    model = bg.build_model(spec(PATCHIFY, "{op: rearrange, pattern: 'b (h w) c -> b c h w'}")).eval()
    x = torch.randn(1, 3, 16, 16)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(twin(x), model(x))


def test_validating_einops_patterns_does_not_import_torch() -> None:
    text = spec(PATCHIFY, "{op: rearrange, pattern: 'b (h w) c -> b c h w'}")
    code = f"import sys, blockgraph; blockgraph.validate({text!r}); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
