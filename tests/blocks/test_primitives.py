"""The primitive ops (blocks/primitives.py), one battery: on each layout an op takes, its static type equals its
module's output at two input sizes, ``params()`` equals the module's parameter count, a backward reaches every
parameter, the build-time rule check (compiler/check.py) passes, and the values equal the plain torch or timm
layer's with the same weights (state_dict keys one to one). Then bad inputs, table-driven, and blocks composed of
primitives against their timm twins."""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import Tensor, nn

import blockgraph as bg
from blockgraph.compiler.check import check_blocks
from blockgraph.graph.cost import block_params
from tests.support.timm_oracle import import_timm

timm = import_timm()

C = 8
"""Channels of the test input."""
SIZES = [(12, 10), (9, 14)]
"""The input sizes (H, W) each op runs at: the first is the spec's default."""

INPUT = {
    "image": "{name: x, op: identity}",
    "tokens": "{name: x, op: map_to_tokens}",
    "vector": "{name: x, op: pool, global: true}",
}
"""The node ``x`` that gives the op under test its input in a layout, from the image ``[B, C, H, W]``."""


def as_layout(image: Tensor, layout: str) -> Tensor:
    """What node ``x`` makes of the image: the op's input."""
    if layout == "tokens":
        return image.flatten(2).transpose(1, 2)  # [B, H*W, C]
    if layout == "vector":
        return image.mean(dim=(2, 3))  # [B, C]
    return image


def make_spec(layout: str, block: str, pre: tuple[str, ...] = (), ports: tuple[str, ...] = ()) -> str:
    """A spec: the image, node ``x`` in ``layout``, the ``pre`` blocks, then node ``op`` (``block``), returned
    (each of its ``ports``, in order)."""
    outputs = ", ".join(f"{p}: op.{p}" for p in ports) if ports else "out: op"
    return "\n".join([
        "name: prim",
        f"input: {{channels: {C}, size: [{SIZES[0][0]}, {SIZES[0][1]}]}}",
        "blocks:",
        f"  - {INPUT[layout]}",
        *(f"  - {p}" for p in pre),
        f"  - {{name: op, {block}}}",
        f"outputs: {{{outputs}}}",
        "",
    ])  # fmt: skip


def twin(path: str, *args: Any, **kwargs: Any) -> Callable[[nn.Module, Tensor], Tensor]:
    """The reference ``timm.<path>(*args, **kwargs)``, given the op module's state_dict (strict: the keys agree)."""

    def ref(module: nn.Module, x: Tensor) -> Tensor:
        layer = timm
        for part in path.split("."):
            layer = getattr(layer, part)
        layer = layer(*args, **kwargs)
        layer.load_state_dict(module.state_dict())
        return layer.eval()(x)

    return ref


def torch_twin(cls: type[nn.Module], *args: Any, **kwargs: Any) -> Callable[[nn.Module, Tensor], Tensor]:
    """The reference ``cls(*args, **kwargs)`` (a torch layer), given the op module's state_dict."""

    def ref(module: nn.Module, x: Tensor) -> Tensor:
        layer = cls(*args, **kwargs)
        layer.load_state_dict(module.state_dict())
        return layer.eval()(x)

    return ref


def image_linear(m: nn.Module, x: Tensor) -> Tensor:
    return F.linear(x.permute(0, 2, 3, 1), m.weight, m.bias).permute(0, 3, 1, 2)


def lift(v: Tensor) -> Tensor:
    """A vector [B, C] broadcast over a map."""
    return v[:, :, None, None]


A, B = "{name: a, op: act, kind: tanh, from: x}", "{name: b, op: act, kind: sigmoid, from: x}"
G = "{name: g, op: pool, global: true, from: x}"
GATE = ("{name: g, op: pool, global: true, from: x}", "{name: s, op: act, kind: sigmoid}")

# id, layout, the op's YAML (after `name: op`), the reference (module, input of the op) → output, blocks before it,
# output ports.
CASES: list[tuple[str, str, str, Callable[..., Any], tuple[str, ...], tuple[str, ...]]] = [
    ("conv2d-3x3", "image", "op: conv2d, dim_out: 12, kernel: 3",
     lambda m, x: F.conv2d(x, m.weight, m.bias, 1, 1), (), ()),
    ("conv2d-depthwise-7x7-stride2-nobias", "image",
     "op: conv2d, dim_out: 8, kernel: 7, stride: 2, groups: 8, bias: false",
     lambda m, x: F.conv2d(x, m.weight, None, 2, 3, groups=8), (), ()),
    ("conv2d-band-1x5-groups", "image", "op: conv2d, dim_out: 4, kernel: [1, 5], groups: 4, dim: 8",
     lambda m, x: F.conv2d(x, m.weight, m.bias, 1, (0, 2), groups=4), (), ()),
    ("conv2d-dilated-same", "image", "op: conv2d, dim_out: 6, kernel: 3, dilation: 2, padding: same",
     twin("layers.create_conv2d", C, 6, 3, dilation=2, padding="same", bias=True), (), ()),
    ("conv2d-patchify", "image", "op: conv2d, dim_out: 16, kernel: [4, 2], stride: [4, 2], padding: 0",
     lambda m, x: F.conv2d(x, m.weight, m.bias, (4, 2)), (), ()),
    ("linear-tokens", "tokens", "op: linear, dim_out: 6", lambda m, x: F.linear(x, m.weight, m.bias), (), ()),
    ("linear-vector-nobias", "vector", "op: linear, dim_out: 5, bias: false, dim: 8",
     lambda m, x: F.linear(x, m.weight), (), ()),
    ("linear-image", "image", "op: linear, dim_out: 6", image_linear, (), ()),
    ("classifier-vector", "vector", "op: classifier, num_classes: 5", lambda m, x: F.linear(x, m.weight, m.bias),
     (), ()),
    ("classifier-none", "vector", "op: classifier, num_classes: 0", lambda m, x: x, (), ()),
    ("norm-layer-image", "image", "op: norm, kind: layer, eps: 1.0e-6",
     twin("layers.LayerNorm2d", C, eps=1e-6), (), ()),
    ("norm-layer-tokens", "tokens", "op: norm, kind: layer", torch_twin(nn.LayerNorm, C), (), ()),
    ("norm-layer-vector-noaffine", "vector", "op: norm, kind: layer, affine: false",
     lambda m, x: F.layer_norm(x, (C,)), (), ()),
    ("norm-batch-image", "image", "op: norm, kind: batch", torch_twin(nn.BatchNorm2d, C), (), ()),
    ("norm-batch-vector", "vector", "op: norm, kind: batch, eps: 1.0e-3",
     torch_twin(nn.BatchNorm1d, C, eps=1e-3), (), ()),
    ("norm-group1-image", "image", "op: norm, kind: group", twin("layers.GroupNorm1", C), (), ()),
    ("norm-group4-image", "image", "op: norm, kind: group, groups: 4, eps: 1.0e-6",
     torch_twin(nn.GroupNorm, 4, C, eps=1e-6), (), ()),
    ("norm-rms-tokens", "tokens", "op: norm, kind: rms, eps: 1.0e-6", twin("layers.RmsNorm", C, eps=1e-6), (), ()),
    ("norm-rms-image", "image", "op: norm, kind: rms, eps: 1.0e-6", twin("layers.RmsNorm2d", C, eps=1e-6), (), ()),
    ("norm-rms-vector", "vector", "op: norm, kind: rms, dim: 8", twin("layers.RmsNorm", C, eps=1e-5), (), ()),
    ("act-gelu", "image", "op: act, kind: gelu", lambda m, x: F.gelu(x), (), ()),
    ("act-gelu_tanh", "tokens", "op: act, kind: gelu_tanh", lambda m, x: F.gelu(x, approximate="tanh"), (), ()),
    ("act-relu", "vector", "op: act, kind: relu", lambda m, x: F.relu(x), (), ()),
    ("act-relu6", "image", "op: act, kind: relu6", lambda m, x: F.relu6(x), (), ()),
    ("act-silu", "tokens", "op: act, kind: silu", lambda m, x: F.silu(x), (), ()),
    ("act-hardswish", "image", "op: act, kind: hardswish", lambda m, x: F.hardswish(x), (), ()),
    ("act-sigmoid", "vector", "op: act, kind: sigmoid", lambda m, x: torch.sigmoid(x), (), ()),
    ("act-tanh", "image", "op: act, kind: tanh", lambda m, x: torch.tanh(x), (), ()),
    ("act-identity", "tokens", "op: act, kind: identity", lambda m, x: x, (), ()),
    ("act-star_relu-image", "image", "op: act, kind: star_relu", twin("models.metaformer.StarReLU"), (), ()),
    ("act-star_relu-tokens", "tokens", "op: act, kind: star_relu", twin("models.metaformer.StarReLU"), (), ()),
    ("dropout-image", "image", "op: dropout, rate: 0.5", lambda m, x: x, (), ()),
    ("dropout-vector", "vector", "op: dropout, rate: 0.1", lambda m, x: x, (), ()),
    ("drop_path-tokens", "tokens", "op: drop_path, rate: 0.3", lambda m, x: x, (), ()),
    ("drop_path-image", "image", "op: drop_path, rate: 0.3", lambda m, x: x, (), ()),
    ("pool-avg-poolformer", "image", "op: pool, kernel: 3, stride: 1, padding: 1, count_include_pad: false",
     lambda m, x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), (), ()),
    ("pool-max-3-stride2", "image", "op: pool, kind: max, kernel: 3, stride: 2, padding: 1",
     lambda m, x: F.max_pool2d(x, 3, 2, 1), (), ()),
    ("pool-avg-2-ceil", "image", "op: pool, kernel: 2, ceil_mode: true",
     lambda m, x: F.avg_pool2d(x, 2, 2, ceil_mode=True), (), ()),
    ("pool-max-rect-ceil", "image", "op: pool, kind: max, kernel: [3, 2], stride: [2, 1], ceil_mode: true",
     lambda m, x: F.max_pool2d(x, (3, 2), (2, 1), ceil_mode=True), (), ()),
    ("pool-global-avg-image", "image", "op: pool, global: true",
     twin("layers.SelectAdaptivePool2d", pool_type="avg", flatten=True), (), ()),
    ("pool-global-max-image", "image", "op: pool, kind: max, global: true",
     twin("layers.SelectAdaptivePool2d", pool_type="max", flatten=True), (), ()),
    ("pool-global-avg-tokens", "tokens", "op: pool, global: true", lambda m, x: x.mean(1), (), ()),
    ("pool-global-max-tokens", "tokens", "op: pool, kind: max, global: true", lambda m, x: x.amax(1), (), ()),
    ("upsample-nearest-2", "image", "op: upsample, scale: 2", lambda m, x: F.interpolate(x, scale_factor=2), (), ()),
    ("upsample-bilinear-size", "image", "op: upsample, mode: bilinear, size: [5, 7], align_corners: true",
     lambda m, x: F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=True), (), ()),
    ("upsample-bilinear-3", "image", "op: upsample, mode: bilinear, scale: 3",
     lambda m, x: F.interpolate(x, scale_factor=3, mode="bilinear"), (), ()),
    ("layer_scale-image", "image", "op: layer_scale, init: 1.0e-6", twin("layers.LayerScale2d", C, 1e-6), (), ()),
    ("layer_scale-tokens", "tokens", "op: layer_scale", twin("layers.LayerScale", C), (), ()),
    ("layer_scale-vector", "vector", "op: layer_scale, init: 0.5, dim: 8", twin("layers.LayerScale", C, 0.5), (), ()),
    ("identity-image", "image", "op: identity", lambda m, x: x, (), ()),
    ("identity-vector", "vector", "op: identity", lambda m, x: x, (), ()),
    ("add-image", "image", "op: add, from: [a, b]", lambda m, x: torch.tanh(x) + torch.sigmoid(x), (A, B), ()),
    ("add-tokens-3", "tokens", "op: add, from: [a, b, x]",
     lambda m, x: torch.tanh(x) + torch.sigmoid(x) + x, (A, B), ()),
    ("add-vector", "vector", "op: add, from: [a, x]", lambda m, x: torch.tanh(x) + x, (A,), ()),
    ("add-image-vector", "image", "op: add, from: [g, x]", lambda m, x: lift(x.mean((2, 3))) + x, (G,), ()),
    ("sub-poolformer", "image", "op: sub, from: [p, x]",
     lambda m, x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x,
     ("{name: p, op: pool, kernel: 3, stride: 1, padding: 1, count_include_pad: false}",), ()),
    ("sub-tokens-vector", "tokens", "op: sub, from: [x, g]", lambda m, x: x - x.mean(1, keepdim=True), (G,), ()),
    ("mul-image-gate", "image", "op: mul, from: [x, s]",
     lambda m, x: x * torch.sigmoid(lift(x.mean((2, 3)))), GATE, ()),
    ("mul-tokens-gate-first", "tokens", "op: mul, from: [s, x, a]",
     lambda m, x: torch.sigmoid(x.mean(1, keepdim=True)) * x * torch.tanh(x), (*GATE, A), ()),
    ("mul-vector", "vector", "op: mul, from: [a, b]", lambda m, x: torch.tanh(x) * torch.sigmoid(x), (A, B), ()),
    ("concat-image-3", "image", "op: concat, from: [a, x, b]",
     lambda m, x: torch.cat([torch.tanh(x), x, torch.sigmoid(x)], 1), (A, B), ()),
    ("concat-tokens", "tokens", "op: concat, from: [x, a]", lambda m, x: torch.cat([x, torch.tanh(x)], -1), (A,), ()),
    ("concat-vector", "vector", "op: concat, from: [a, x]", lambda m, x: torch.cat([torch.tanh(x), x], -1), (A,), ()),
    ("split-image", "image", "op: split, sizes: [2, 6]", lambda m, x: torch.split(x, [2, 6], 1), (), ("s0", "s1")),
    ("split-tokens-named", "tokens", "op: split, sizes: [3, 3, 2], names: [q, k, v]",
     lambda m, x: torch.split(x, [3, 3, 2], -1), (), ("q", "k", "v")),
    ("split-vector", "vector", "op: split, sizes: [4, 4]", lambda m, x: torch.split(x, 4, -1), (), ("s0", "s1")),
]  # fmt: skip


def outputs(value: Any, ports: tuple[str, ...]) -> list[Tensor]:
    return [value] if isinstance(value, Tensor) else [value[p] for p in ports]


@pytest.mark.parametrize(("layout", "block", "ref", "pre", "ports"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_primitive_agrees_with_its_rules_and_its_torch_twin(layout, block, ref, pre, ports) -> None:
    text = make_spec(layout, block, pre, ports)
    bg.validate(text)
    torch.manual_seed(0)
    model = bg.build_model(text)
    inference, op = model.inference, model.get_submodule("op")
    assert block_params(inference, "op") == sum(p.numel() for p in op.parameters())
    assert check_blocks(inference) == len(inference.graph) - 1  # every node but the input, on the meta device
    static = model.node_types()["op"]
    static = [static] if not ports else [static[p] for p in ports]
    model.train()
    for h, w in SIZES:
        image = torch.randn(2, C, h, w, requires_grad=True)
        out = outputs(model(image), ports)
        assert [tuple(o.shape) for o in out] == [t.shape({"H": h, "W": w}, batch=2) for t in static]
    sum((o * torch.randn_like(o)).sum() for o in out).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in [image, *model.parameters()])
    model.eval()
    with torch.no_grad():
        image = torch.randn(2, C, *SIZES[1])
        expected = ref(op, as_layout(image, layout))
        expected = list(expected) if isinstance(expected, tuple | list) else [expected]
        for got, want in zip(outputs(model(image), ports), expected, strict=True):
            torch.testing.assert_close(got, want)


def test_every_primitive_op_is_in_the_battery() -> None:
    from blockgraph.blocks import primitives
    from blockgraph.spec.plugins import registry

    ops = {op for op, cls in registry().items() if cls.__module__ == primitives.__name__}
    tested = {re.search(r"op: (\w+)", block).group(1) for _, _, block, *_ in CASES}  # type: ignore[union-attr]
    assert ops == tested


def test_channel_ops_on_a_map_do_not_depend_on_its_memory_format() -> None:
    """LayerNorm2d, RmsNorm2d and Linear2d permute to channels-last: an NCHW and a channels-last input of the same
    values give the same values."""
    image = torch.randn(2, C, 12, 10)
    last = image.to(memory_format=torch.channels_last)
    for block in ("op: norm, kind: layer", "op: norm, kind: rms", "op: linear, dim_out: 6", "op: layer_scale"):
        model = bg.build_model(make_spec("image", block)).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(image), model(last), rtol=0, atol=0)


def test_batch_norm_is_decided_per_instance() -> None:
    """``norm`` uses batch statistics only with ``kind: batch``: there, a training batch of one that leaves one value
    per channel (a vector, or a 1x1 map) is a ShapeError naming the node; other kinds have no such guard."""
    vector = bg.build_model(make_spec("vector", "op: norm, kind: batch"))
    with pytest.raises(bg.ShapeError, match=r"leaves node 'op' \(norm\) a vector: its BatchNorm") as e:
        vector.train()(torch.randn(1, C, 12, 10))
    assert "larger images" not in e.value.hint
    assert vector.eval()(torch.randn(1, C, 12, 10)).shape == (1, C)
    image = bg.build_model(make_spec("image", "op: norm, kind: batch")).train()
    with pytest.raises(bg.ShapeError, match=r"leaves node 'op' \(norm\) a 1x1 map"):
        image(torch.randn(1, C, 1, 1))
    assert image(torch.randn(1, C, 2, 1)).shape == (1, C, 2, 1)
    assert "_reject_single" not in bg.build_model(make_spec("vector", "op: norm, kind: layer")).code


# ------------------------------------------------------------------------------------------------------- bad inputs

CLS = "{name: cls, op: insert_cls_token, dim: 8}"
SMALL = "{name: small, op: upsample, size: [2, 2]}"

BAD: list[tuple[str, str, str, tuple[str, ...], type[Exception], str]] = [
    ("conv2d-on-tokens", "tokens", "op: conv2d, dim_out: 8, kernel: 3", (), bg.ShapeError,
     r"op 'conv2d' takes image as its input, got tokens"),
    ("conv2d-dim", "image", "op: conv2d, dim_out: 8, kernel: 3, dim: 5", (), bg.ShapeError,
     r"input has 8 channels but `dim` is 5"),
    ("conv2d-groups-in", "image", "op: conv2d, dim_out: 9, kernel: 3, groups: 3", (), bg.ShapeError,
     r"input channels 8 is not divisible by groups 3"),
    ("conv2d-groups-out", "image", "op: conv2d, dim_out: 10, kernel: 3, groups: 4", (), bg.ShapeError,
     r"dim_out 10 is not divisible by groups 4"),
    ("conv2d-same-stride", "image", "op: conv2d, dim_out: 8, kernel: 3, stride: 2, padding: same", (), bg.ShapeError,
     r"`padding: same` with kernel \[3, 3\], stride \[2, 2\]"),
    ("conv2d-same-even", "image", "op: conv2d, dim_out: 8, kernel: [3, 4], padding: same", (), bg.ShapeError,
     r"would pad the two sides unevenly"),
    ("conv2d-window", "image", "op: conv2d, dim_out: 8, kernel: 11, padding: 0", (), bg.ShapeError,
     r"input 12x10: the map \(W\) is smaller than the kernel window 11"),
    ("conv2d-window-constant", "image", "op: conv2d, dim_out: 8, kernel: 3, padding: 0", (SMALL,), bg.ShapeError,
     r"smaller than the kernel window 3 .*never holds"),
    ("conv2d-kernel-zero", "image", "op: conv2d, dim_out: 8, kernel: 0", (), bg.SpecError,
     r"'kernel' in block 'op' \(conv2d\): expected a positive int or a pair \[h, w\] of them \(got 0\)"),
    ("conv2d-kernel-triple", "image", "op: conv2d, dim_out: 8, kernel: [3, 3, 3]", (), bg.SpecError,
     r"'kernel' .*: expected a positive int or a pair"),
    ("conv2d-padding-word", "image", "op: conv2d, dim_out: 8, kernel: 3, padding: valid", (), bg.SpecError,
     r"'padding' .*: expected an int >= 0 or a pair \[h, w\] of them, or `same` \(got 'valid'\)"),
    ("linear-dim", "tokens", "op: linear, dim_out: 8, dim: 4", (), bg.ShapeError,
     r"input has 8 channels but `dim` is 4"),
    ("classifier-tokens", "tokens", "op: classifier, num_classes: 5", (), bg.ShapeError,
     r"op 'classifier' takes vector as its input, got tokens"),
    ("norm-batch-tokens", "tokens", "op: norm, kind: batch", (), bg.ShapeError,
     r"`kind: batch` normalizes image or vector, got tokens"),
    ("norm-group-vector", "vector", "op: norm, kind: group", (), bg.ShapeError, r"`kind: group` normalizes image"),
    ("norm-group-divides", "image", "op: norm, kind: group, groups: 3", (), bg.ShapeError,
     r"channels 8 is not divisible by groups 3"),
    ("norm-groups-not-group", "image", "op: norm, kind: layer, groups: 2", (), bg.ShapeError,
     r"`groups` applies to `kind: group`"),
    ("norm-kind", "image", "op: norm, kind: instance", (), bg.SpecError, r"'kind'.*'layer', 'batch', 'group' or 'rms'"),
    ("act-kind", "image", "op: act, kind: swish", (), bg.SpecError, r"'kind'"),
    ("dropout-rate", "image", "op: dropout, rate: 1.0", (), bg.SpecError, r"'rate'.*less than 1"),
    ("pool-no-kernel", "image", "op: pool", (), bg.ShapeError, r"pooling needs a `kernel`"),
    ("pool-padding", "image", "op: pool, kernel: 3, padding: 2", (), bg.ShapeError,
     r"padding 2 is more than half the window 3"),
    ("pool-ceil", "image", "op: pool, kernel: 2, stride: 3, ceil_mode: true", (), bg.ShapeError,
     r"`ceil_mode` with stride 3 \+ padding 0 > kernel 2"),
    ("pool-window", "image", "op: pool, kernel: 3", (SMALL,), bg.ShapeError, r"smaller than the kernel window 3"),
    ("pool-on-vector", "vector", "op: pool, kernel: 2", (), bg.ShapeError, r"op 'pool' takes image as its input"),
    ("pool-max-count-pad", "image", "op: pool, kind: max, kernel: 3, count_include_pad: false", (), bg.ShapeError,
     r"`count_include_pad` applies to `kind: avg`"),
    ("pool-global-cls", "tokens", "op: pool, global: true", (CLS,), bg.ShapeError, r"expects 0 extra token\(s\)"),
    ("pool-global-kernel", "image", "op: pool, global: true, kernel: 3", (), bg.ShapeError,
     r"`kernel` does not apply to global pooling"),
    ("upsample-both", "image", "op: upsample, scale: 2, size: [4, 4]", (), bg.ShapeError,
     r"exactly one of `scale` and `size`"),
    ("upsample-neither", "image", "op: upsample", (), bg.ShapeError, r"exactly one of `scale` and `size`"),
    ("upsample-align-nearest", "image", "op: upsample, scale: 2, align_corners: true", (), bg.ShapeError,
     r"`align_corners` applies to `mode: bilinear`"),
    ("upsample-tokens", "tokens", "op: upsample, scale: 2", (), bg.ShapeError, r"takes image as its input"),
    ("layer_scale-dim", "image", "op: layer_scale, dim: 16", (), bg.ShapeError,
     r"input has 8 channels but `dim` is 16"),
    ("add-one", "image", "op: add", (), bg.ShapeError, r"op 'add' takes two or more inputs, got 1"),
    ("add-layouts", "image", "op: add, from: [x, t]", ("{name: t, op: map_to_tokens, from: x}",), bg.ShapeError,
     r"op 'add' needs inputs of one type, but input 0 is image\[8, H, W\] and input 1 is tokens\[H\*W, 8\]"),
    ("add-sizes", "image", "op: add, from: [x, p]", ("{name: p, op: pool, kernel: 2, from: x}",), bg.ShapeError,
     r"input 1 is image\[8, H//2, W//2\]"),
    ("mul-gate-width", "image", "op: mul, from: [x, f]", (G, "{name: f, op: linear, dim_out: 4}"), bg.ShapeError,
     r"input 0 is image\[8, H, W\] and input 1 is vector\[4\]"),
    ("sub-three", "image", "op: sub, from: [x, a, b]", (A, B), bg.GraphError, r"op 'sub' takes 2 inputs"),
    ("concat-sizes", "image", "op: concat, from: [x, p]", ("{name: p, op: pool, kernel: 2, from: x}",),
     bg.ShapeError, r"cannot concatenate input 0 \(image\[8, H, W\]\) and input 1 \(image\[8, H//2, W//2\]\)"),
    ("concat-layouts", "image", "op: concat, from: [x, g]", (G,), bg.ShapeError, r"cannot concatenate input 0"),
    ("concat-cls", "tokens", "op: concat, from: [x, cls]", (CLS,), bg.ShapeError, r"cannot concatenate"),
    ("split-sum", "image", "op: split, sizes: [4, 6]", (), bg.ShapeError,
     r"the parts add up to 10 channels, the input has 8"),
    ("split-one", "image", "op: split, sizes: [8]", (), bg.SpecError, r"'sizes'.*at least 2"),
    ("split-names-count", "image", "op: split, sizes: [4, 4], names: [a, b, c]", (), bg.SpecError,
     r"3 names for 2 parts"),
    ("split-names-twice", "image", "op: split, sizes: [4, 4], names: [a, a]", (), bg.SpecError, r"names must differ"),
    ("split-names-identifiers", "image", "op: split, sizes: [4, 4], names: [a, 2b]", (), bg.SpecError, r"names are"),
]  # fmt: skip


@pytest.mark.parametrize(("layout", "block", "pre", "error", "match"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_inputs_are_clear_errors(layout, block, pre, error, match) -> None:
    ports = ("s0",) if "op: split" in block else ()  # an output reads a port of a node with several
    with pytest.raises(error, match=match):
        bg.validate(make_spec(layout, block, pre, ports))


@pytest.mark.parametrize(
    ("outputs", "match", "hint"),
    [("{out: op.c}", r"'op' has no output port 'c'", "ports of 'op': a, b"),
     ("{out: op}", r"'op' has several outputs; name one of them: op.a, op.b", "ports of 'op': a, b"),
     ("{out: x.a}", r"'x' has no output port 'a'", "ports of 'x': none (it has a single output)")],
)  # fmt: skip
def test_an_output_must_name_a_port_its_node_has(outputs: str, match: str, hint: str) -> None:
    text = make_spec("image", "op: split, sizes: [4, 4], names: [a, b]").replace(
        "outputs: {out: op}", f"outputs: {outputs}"
    )
    with pytest.raises(bg.ShapeError, match=match) as e:
        bg.validate(text)
    assert e.value.hint == hint and e.value.node == "out"


# ------------------------------------------------------------------------------------- blocks composed of primitives

CONVNEXT = """
name: convnext_block
input: {channels: 16, size: [14, 14]}
blocks:
  - {name: conv_dw, op: conv2d, dim_out: 16, kernel: 7, groups: 16}
  - {name: norm, op: norm, kind: layer, eps: 1.0e-6}
  - {name: fc1, op: linear, dim_out: 64}
  - {name: act, op: act, kind: gelu}
  - {name: fc2, op: linear, dim_out: 16}
  - {name: ls, op: layer_scale, init: 1.0e-6}
  - {name: drop_path, op: drop_path, rate: 0.1}
  - {name: out, op: add, from: [drop_path, image]}
outputs: {out: out}
"""

POOLFORMER = """
name: poolformer_block
input: {channels: 16, size: [14, 14]}
blocks:
  - {name: norm1, op: norm, kind: group}
  - {name: pool, op: pool, kernel: 3, stride: 1, padding: 1, count_include_pad: false}
  - {name: mixer, op: sub, from: [pool, norm1]}
  - {name: layer_scale1, op: layer_scale}
  - {name: res1, op: add, from: [image, layer_scale1]}
  - {name: norm2, op: norm, kind: group}
  - {name: fc1, op: conv2d, dim_out: 64, kernel: 1}
  - {name: act, op: act, kind: gelu}
  - {name: fc2, op: conv2d, dim_out: 16, kernel: 1}
  - {name: layer_scale2, op: layer_scale}
  - {name: out, op: add, from: [res1, layer_scale2]}
outputs: {out: out}
"""

INCEPTION = """
name: inception_dw
input: {channels: 16, size: [14, 14]}
blocks:
  - {name: split, op: split, sizes: [10, 2, 2, 2], names: [id, hw, w, h]}
  - {name: dwconv_hw, op: conv2d, dim_out: 2, kernel: 3, groups: 2, from: split.hw}
  - {name: dwconv_w, op: conv2d, dim_out: 2, kernel: [1, 11], groups: 2, from: split.w}
  - {name: dwconv_h, op: conv2d, dim_out: 2, kernel: [11, 1], groups: 2, from: split.h}
  - {name: out, op: concat, from: [split.id, dwconv_hw, dwconv_w, dwconv_h]}
outputs: {out: out}
"""


def _renamed(state: dict[str, Tensor], rules: list[tuple[str, str]]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, to in rules:
            key = re.sub(pattern, to, key)
        out[key] = value
    return out


@pytest.mark.parametrize(
    ("text", "make_twin", "rules"),
    [
        (CONVNEXT, lambda: timm.models.convnext.ConvNeXtBlock(16, ls_init_value=1e-6),
         [(r"^mlp\.", ""), (r"^gamma$", "ls.gamma")]),
        (POOLFORMER, lambda: timm.models.metaformer.MetaFormerBlock(
            16, mlp_act=nn.GELU, mlp_bias=True, norm_layer=timm.layers.GroupNorm1, layer_scale_init_value=1e-5),
         [(r"^mlp\.", ""), (r"^layer_scale(\d)\.scale$", r"layer_scale\1.gamma")]),
        (INCEPTION, lambda: timm.models.inception_next.InceptionDWConv2d(16), []),
    ],
    ids=["convnext", "poolformer", "inception_next_dwconv"],
)  # fmt: skip
def test_blocks_composed_of_primitives_equal_their_timm_twins(text: str, make_twin, rules) -> None:
    torch.manual_seed(0)
    reference = make_twin().eval()
    for p in reference.parameters():  # away from the inits (a layer scale of 1e-6 hides the branch)
        nn.init.normal_(p, 0.0, 0.5)
    model = bg.build_model(text).eval()
    model.load_state_dict(_renamed(reference.state_dict(), rules))
    assert bg.validate(text).params == sum(p.numel() for p in reference.parameters())
    x = torch.randn(2, 16, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), reference(x))


class _InceptionMixer(nn.Module):
    """The INCEPTION model's layers called in a straight line (the compiled forward checks its input's size first,
    which torch.fx cannot trace): a multi-output split and a concatenation of several inputs, traced."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        x_id, x_hw, x_w, x_h = m.split(x)
        return m.out(x_id, m.dwconv_hw(x_hw), m.dwconv_w(x_w), m.dwconv_h(x_h))


def test_composed_models_pickle_copy_and_trace() -> None:
    x = torch.randn(1, 16, 14, 14)
    for text in (CONVNEXT, POOLFORMER, INCEPTION):
        model = bg.build_model(text).eval()
        with torch.no_grad():
            want = model(x)
            for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
                torch.testing.assert_close(copied(x), want, rtol=0, atol=0)
    traced = torch.fx.symbolic_trace(_InceptionMixer(model))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), want, rtol=0, atol=0)
