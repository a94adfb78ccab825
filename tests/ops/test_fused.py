"""The eager-inference kernels (blockgraph/ops/fused.py) against the plain layers they replace: each kernel alone,
the folded-weight cache under every way weights change, when the fused path runs (and when it must not), and whole
reference models fused vs plain in float64, where any difference in the math would show."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn

import blockgraph as bg
from blockgraph.ops import fused
from tests.support.weights import randomize_batchnorm


def _ops_called(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


# --------------------------------------------------------------------------------------------------------- enabled


def test_enabled_only_in_eval_without_autograd() -> None:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        assert not fused.enabled(m)  # training mode: dropout and drop path are live
        assert fused.enabled(m.eval())
    with torch.inference_mode():
        assert fused.enabled(m)
    assert not fused.enabled(m)  # autograd records: the fused ops have no derivative formula


def test_not_enabled_while_compiling_or_exporting() -> None:
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(fused.enabled(self))
            return x + 1

    probe = Probe().eval()
    with torch.no_grad():
        torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(2))
        torch.export.export(probe, (torch.zeros(2),))
    assert seen and not any(seen)


# ---------------------------------------------------------------------------------------------------------- linear


ACTS = [None, nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU(), nn.Hardswish(), nn.Tanh(), nn.Identity()]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: repr(a))
@pytest.mark.parametrize("shape", [(7, 24), (2, 9, 24), (2, 3, 4, 24)])
def test_linear_with_activation_equals_the_layers(act: nn.Module | None, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer, x = nn.Linear(24, 40), torch.randn(shape)
    with torch.no_grad():
        expected = layer(x) if act is None else act(layer(x))
        torch.testing.assert_close(fused.linear(x, layer, act), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_residual_equals_the_layer_plus_residual(bias: bool) -> None:
    torch.manual_seed(0)
    layer, x = nn.Linear(24, 16, bias=bias), torch.randn(2, 9, 24)
    residual = torch.randn(2, 16, 9).transpose(1, 2)  # a strided residual too
    with torch.no_grad():
        torch.testing.assert_close(fused.linear(x, layer, residual=residual), residual + layer(x), rtol=0, atol=1e-5)
        broadcast = torch.randn(16)  # not the output's shape: the plain add
        torch.testing.assert_close(fused.linear(x, layer, residual=broadcast), broadcast + layer(x), rtol=0, atol=0)


def test_linear_runs_onednn_on_the_cpu_in_float32_and_plain_ops_elsewhere() -> None:
    layer, x = nn.Linear(8, 8), torch.randn(3, 8)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in _ops_called(lambda: fused.linear(x, layer, nn.GELU()))
        double = nn.Linear(8, 8).double()
        called = _ops_called(lambda: fused.linear(x.double(), double, nn.GELU()))
        assert "mkldnn::_linear_pointwise" not in called and "aten::gelu_" not in called  # GELU has no in-place form
        torch.testing.assert_close(
            fused.linear(x.double(), double, nn.SiLU()), F.silu(double(x.double())), rtol=0, atol=1e-15
        )


# ------------------------------------------------------------------------------------------------- Linear (dense)


def test_the_blocks_linear_layers_are_nn_linear_with_its_state() -> None:
    from blockgraph.blocks.base import linear

    layer = linear(24, 40)
    assert isinstance(layer, nn.Linear) and type(layer) is fused.Linear
    assert list(layer.state_dict()) == ["weight", "bias"] and repr(layer) == repr(nn.Linear(24, 40))
    x = torch.randn(3, 24)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # eager: F.linear itself
    assert linear(24, 40, device="meta")(x.to("meta")).shape == (3, 40)


@pytest.mark.skipif(not fused._ONEDNN, reason="oneDNN's matrix multiply")
def test_linear_runs_onednn_in_graphs_compiled_for_inference_on_large_products() -> None:
    """oneDNN in a graph traced without gradients when the product is large enough, ``F.linear`` (so autograd)
    otherwise; the compiled result equals the layer's. ``aot_eager`` runs the traced graph eagerly (the ops it holds
    show in the profile); inductor once, for the values."""
    torch.manual_seed(0)
    layer = fused.Linear(256, 512)
    large = torch.randn(1, 512, 256)  # 512 * 256 * 512 multiply-adds: at least COMPILED_ONEDNN_MIN_MACS
    small = torch.randn(1, 64, 256)
    assert large.numel() * 512 >= fused.COMPILED_ONEDNN_MIN_MACS > small.numel() * 512

    def graph_ops(x: torch.Tensor) -> set[str]:
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)
        compiled(x)
        return _ops_called(lambda: compiled(x))

    with torch.no_grad():
        assert "blockgraph::onednn_linear" in graph_ops(large)
        assert "blockgraph::onednn_linear" not in graph_ops(small)
        assert "blockgraph::onednn_linear" not in _ops_called(lambda: layer(large))  # eager: F.linear
        got = torch.compile(layer, fullgraph=True, dynamic=False)(large)
        torch.testing.assert_close(got, F.linear(large, layer.weight, layer.bias), rtol=0, atol=1e-5)
    assert "blockgraph::onednn_linear" not in graph_ops(large)  # gradients recorded: F.linear
    torch._dynamo.reset()
    x = large.clone().requires_grad_()
    torch.compile(layer, backend="aot_eager", fullgraph=True)(x).square().sum().backward()
    expected = torch.autograd.grad(F.linear(large, layer.weight, layer.bias).square().sum(), layer.weight)[0]
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------------------- conv_bn


def _conv_bn(groups: int = 1, bias: bool = False, stride: int = 1, kernel: int = 3) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16 if groups == 1 else 8, kernel, stride, kernel // 2, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(conv.out_channels)
    randomize_batchnorm(bn, torch.Generator().manual_seed(1))
    return conv, bn.eval()


@pytest.mark.parametrize("act", [None, nn.ReLU(), nn.SiLU(), nn.Hardswish(), nn.GELU()], ids=repr)
@pytest.mark.parametrize(("groups", "bias", "stride", "kernel"), [(1, False, 1, 3), (8, True, 2, 3), (1, True, 1, 1)])
def test_conv_bn_folds_to_the_same_result(act, groups: int, bias: bool, stride: int, kernel: int) -> None:
    conv, bn = _conv_bn(groups, bias, stride, kernel)
    x = torch.randn(2, 8, 13, 11)
    with torch.no_grad():
        expected = bn(conv(x)) if act is None else act(bn(conv(x)))
        got = fused.conv_bn(x, conv, bn, act)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if groups == 1 and kernel > 1:  # on the CPU the folded weight is channels-last, so is the map (and the next)
        assert got.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # a 1x1 or depthwise weight has either layout: the map keeps the input's
        got = fused.conv_bn(x.contiguous(memory_format=torch.channels_last), conv, bn, act)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    conv64, bn64 = conv.double(), bn.double()
    with torch.no_grad():
        expected = bn64(conv64(x.double()))
        torch.testing.assert_close(fused.conv_bn(x.double(), conv64, bn64), expected, rtol=0, atol=1e-13)


def test_the_folded_weights_follow_every_change_of_the_layers() -> None:
    conv, bn = _conv_bn()
    x = torch.randn(2, 8, 6, 6)

    def check() -> None:
        with torch.no_grad():
            torch.testing.assert_close(fused.conv_bn(x, conv, bn), bn(conv(x)), rtol=0, atol=1e-5)

    check()
    first = conv.__dict__["_blockgraph_folded"]
    check()
    assert conv.__dict__["_blockgraph_folded"] is first  # unchanged layers: the cached pair
    with torch.no_grad():
        bn.running_var.mul_(3.0)  # in place: a new version
    check()
    conv.weight.grad = torch.ones_like(conv.weight)
    torch.optim.SGD(conv.parameters(), lr=0.5).step()  # an optimizer step
    check()
    other_conv, other_bn = _conv_bn()
    randomize_batchnorm(other_bn, torch.Generator().manual_seed(7))
    conv.load_state_dict(other_conv.state_dict())
    bn.load_state_dict(other_bn.state_dict())
    check()
    bn.bias = nn.Parameter(torch.full((16,), 2.0))  # a new tensor altogether
    check()
    bn.eps = 0.1
    check()
    assert "_blockgraph_folded" not in conv.state_dict() and "_blockgraph_folded" not in dict(conv.named_buffers())


def test_conv_bn_without_running_statistics_runs_the_plain_layers() -> None:
    conv, _ = _conv_bn()
    bn = nn.BatchNorm2d(16, track_running_stats=False).eval()  # normalizes by the batch even in eval
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused.conv_bn(x, conv, bn), bn(conv(x)), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny", "vit_tiny_patch16_224", "mobilevit_xxs", "mpvit_tiny"])
def test_fused_inference_equals_the_plain_model(name: str) -> None:
    """The same model, fused (eval + no_grad) vs its modules' own ops (autograd on), in float64: the fused math
    is the plain math (1e-10), and in float32 they agree within the 1e-5 the twins are held to."""
    torch.manual_seed(0)
    model = bg.create_model(name).eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(3))
    h, w = model.spec.input.size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        model, x = model.to(dtype), x.to(dtype)
        with torch.no_grad():
            got = model(x)
        plain = model(x).detach()
        torch.testing.assert_close(got, plain, rtol=0, atol=atol)


def test_training_mode_runs_the_plain_layers() -> None:
    model = bg.create_model("mobilevit_xxs").train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        called = _ops_called(lambda: model(x))
    assert "mkldnn::_linear_pointwise" not in called and "aten::native_batch_norm" in called
    with torch.no_grad():
        called = _ops_called(lambda: model.eval()(x))
    assert "mkldnn::_linear_pointwise" in called and "aten::native_batch_norm" not in called


# ------------------------------------------------------------------------------------------------ merged_depthwise


def _depthwise(channels: int, kernel: int, bias: bool = True, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=bias, **kwargs)


def test_merged_depthwise_equals_the_split_convolutions() -> None:
    torch.manual_seed(0)
    convs = [_depthwise(4, 3), _depthwise(6, 7, bias=False), _depthwise(2, 5)]
    x = torch.randn(2, 12, 9, 11)
    with torch.no_grad():
        expected = torch.cat([c(p) for c, p in zip(convs, torch.split(x, [4, 6, 2], 1), strict=True)], 1)
        weight, bias = fused.merged_depthwise(convs)
        got = F.conv2d(x, weight, bias, padding=3, groups=12)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert fused.merged_depthwise(convs)[0] is weight  # cached
        convs[1].weight.mul_(2.0)  # and remade when a weight changes
        expected = torch.cat([c(p) for c, p in zip(convs, torch.split(x, [4, 6, 2], 1), strict=True)], 1)
        weight, bias = fused.merged_depthwise(convs)
        torch.testing.assert_close(F.conv2d(x, weight, bias, padding=3, groups=12), expected, rtol=0, atol=1e-5)


def test_merge_depthwise_is_differentiable() -> None:
    """The uncached merge (the plain path's: training, compile) passes gradients to each convolution's own tensors,
    the padded taps' gradients dropped: the same gradients as the split convolutions, in float64."""
    torch.manual_seed(0)
    convs = [_depthwise(4, 3).double(), _depthwise(6, 7, bias=False).double(), _depthwise(2, 5).double()]
    x = torch.randn(2, 12, 9, 11, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 12, 9, 11, dtype=torch.float64)
    inputs = (x, *(p for c in convs for p in c.parameters()))
    expected = torch.cat([c(p) for c, p in zip(convs, torch.split(x, [4, 6, 2], 1), strict=True)], 1)
    got = F.conv2d(x, *fused.merge_depthwise(convs), padding=3, groups=12)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(got, inputs, upstream)
    for g, e in zip(grads, torch.autograd.grad(expected, inputs, upstream), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "odd_one",
    [
        nn.Conv2d(4, 4, 4, padding=2, groups=4),  # even kernel: no center
        _depthwise(4, 3, stride=2),
        _depthwise(4, 3, dilation=2),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),  # not depthwise
        nn.Conv2d(4, 4, 3, padding=0, groups=4),  # not 'same'
        _depthwise(4, 3, padding_mode="reflect"),
    ],
    ids=["even", "stride", "dilation", "grouped", "valid", "reflect"],
)
def test_merged_depthwise_refuses_what_it_cannot_merge(odd_one: nn.Conv2d) -> None:
    assert fused.merged_depthwise([_depthwise(4, 5), odd_one]) is None


# ------------------------------------------------------------------------------------------------ depthwise_conv2d


def _token_map(batch: int, channels: int, h: int, w: int, **kwargs) -> torch.Tensor:
    """Tokens ``[B, h*w, C]`` viewed as a map ``[B, C, h, w]`` (channels innermost), as CoaT's CPE and CRPE do."""
    return torch.randn(batch, h * w, channels, **kwargs).transpose(1, 2).view(batch, channels, h, w)


def test_depthwise_conv2d_equals_the_layer_with_its_gradients() -> None:
    torch.manual_seed(0)
    conv = _depthwise(6, 3).double()
    x = _token_map(2, 6, 5, 7, dtype=torch.float64).requires_grad_()
    upstream = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    inputs = (x, conv.weight, conv.bias)
    got = fused.depthwise_conv2d(x, conv.weight, conv.bias, 1)
    expected = conv(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(got, inputs, upstream)
    for g, e in zip(grads, torch.autograd.grad(expected, inputs, upstream), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's layout choice")
def test_depthwise_conv2d_keeps_a_batch_one_token_map_channels_last() -> None:
    """A token map at batch 1: with the layer's own weight oneDNN reads the input as channels-first (its batch
    stride) and copies it to NCHW; with the weight viewed channels-last it runs on the input as it is and returns
    channels-last, the same values. A channels-first input keeps the layer's kernel: the same bits."""
    torch.manual_seed(0)
    conv = _depthwise(16, 3)
    x = _token_map(1, 16, 5, 7)
    with torch.no_grad():
        plain = conv(x)
        got = fused.depthwise_conv2d(x, conv.weight, conv.bias, 1)
        assert "aten::copy_" in _ops_called(lambda: conv(x))  # the case this is for
        assert "aten::copy_" not in _ops_called(lambda: fused.depthwise_conv2d(x, conv.weight, conv.bias, 1))
        assert plain.is_contiguous() and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)
        nchw = x.contiguous()
        assert torch.equal(fused.depthwise_conv2d(nchw, conv.weight, conv.bias, 1), conv(nchw))


@pytest.mark.parametrize("extra", [0, 1])
def test_coat_factor_attention_fused_equals_plain(extra: int) -> None:
    """The fused factor attention (token layout, CRPE added in place from the cached merged conv, channels-last),
    against the plain path (itself checked against the split windows in tests/blocks/test_optimizations.py), in
    float64, with and without a cls token."""
    from blockgraph.blocks.coat import ConvRelPosEnc, FactorAttnConvRelPosEnc

    torch.manual_seed(0)
    attn = FactorAttnConvRelPosEnc(32, heads=8).double().eval()
    crpe = ConvRelPosEnc(4, 8, {3: 2, 5: 3, 7: 3}).double().eval()
    x = torch.randn(2, extra + 5 * 6, 32, dtype=torch.float64)
    residual = torch.randn_like(x)
    plain = attn(x, (5, 6), crpe, residual).detach()
    with torch.no_grad():
        torch.testing.assert_close(attn(x, (5, 6), crpe, residual), plain, rtol=0, atol=1e-12)
