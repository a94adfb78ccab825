"""The convolution ops (blockgraph/ops/conv.py) against the plain layers: a convolution with its activation in
oneDNN's epilogue, Conv-BN folded in eager inference (and
its cache under every way weights change), depthwise convolutions merged into one, a depthwise convolution of
a token map viewed channels-last, and the depthwise convolution's training backward (torch's and ours, with the C++
weight-gradient kernel)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from blockgraph.ops import _cpp, autotune
from blockgraph.ops import linear as linear_module
from blockgraph.ops.autotune import choices, forcing, tuning
from blockgraph.ops.conv import conv2d, conv_bn, depthwise_conv2d, depthwise_conv2d_backward, merge_depthwise
from blockgraph.ops.linear import post_op
from tests.support.weights import ops_called, randomize_batchnorm

ACTS = [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU(), nn.Hardswish()]


@pytest.mark.parametrize("act", [None, *ACTS], ids=repr)
@pytest.mark.parametrize(
    ("shape", "weight", "stride", "padding", "groups", "channels_last"),
    [
        ((2, 16, 14, 13), (64, 16, 1, 1), 1, 0, 1, False),  # an MLP's 1x1 (InceptionNeXt's, NCHW)
        ((2, 16, 14, 13), (64, 16, 1, 1), 1, 0, 1, True),  # ConvNeXt's, channels-last
        ((2, 16, 15, 15), (32, 16, 3, 3), 2, 1, 1, True),  # a strided stem
        ((2, 16, 14, 13), (16, 1, 3, 3), 1, 1, 16, True),  # PVT-v2's depthwise 3x3
        ((2, 16, 14, 13), (16, 1, 3, 3), 1, 1, 16, False),
    ],
)
def test_a_convolution_with_its_activation_gives_the_plain_values_with_either_kernel(
    act: nn.Module | None, shape, weight, stride: int, padding: int, groups: int, channels_last: bool
) -> None:
    """oneDNN's convolution (on the packed weight for a channels-last input) with the activation as a post-op, or
    none, and the plain one (then the activation in place): the same values as F.conv2d then the module, within
    float32 rounding, in the input's memory format; with autograd on, the plain ops (and their gradients: the
    training kernel of a channels-last 1x1 convolution, forced plain here, has a test of its own)."""
    apply = act or nn.Identity()
    torch.manual_seed(0)
    x, w, b = torch.randn(shape), torch.randn(weight) / weight[1] ** 0.5, torch.randn(weight[0])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = ((stride, stride), (padding, padding), (1, 1), groups)
    expected = apply(F.conv2d(x, w, b, *args))
    fmt = torch.channels_last if channels_last else torch.contiguous_format  # (the map keeps the input's)
    for kernel in ("fused", "plain"):
        with torch.no_grad(), forcing(kernel):
            got = conv2d(x, w, b, *args, act)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=kernel)
        assert got.is_contiguous(memory_format=fmt), kernel
    w.requires_grad_()
    with forcing("plain"):
        got = conv2d(x, w, b, *args, act)
    assert torch.equal(got, apply(F.conv2d(x, w, b, *args)))
    (g,) = torch.autograd.grad(got.sum(), w)
    (ref,) = torch.autograd.grad(apply(F.conv2d(x, w, b, *args)).sum(), w)
    assert torch.equal(g, ref)


def test_a_fused_convolution_is_chosen_by_measuring_and_recorded_as_one_call() -> None:
    """The first call of a shape times both kernels (autotune.choices lists the choice); oneDNN's pointwise
    convolution is the one op the fused kernel runs (no separate activation pass)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(24, 8, 1, 1), torch.randn(24)
    with torch.no_grad(), tuning(True):
        conv2d(x, w, b, (1, 1), (0, 0), (1, 1), 1, nn.GELU())
    key = [k for k in choices() if k[:3] == ("conv2d", "gelu", "none") and k[3] == (2, 8, 9, 9)]
    assert key and set(choices()[key[0]].seconds) == {"fused", "plain"}
    with torch.no_grad(), forcing("fused"):
        called = ops_called(lambda: conv2d(x, w, b, (1, 1), (0, 0), (1, 1), 1, nn.GELU()))
    assert "mkldnn::_convolution_pointwise" in called and "aten::gelu" not in called


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize(
    ("shape", "weight", "padding", "groups", "channels_last"),
    [
        ((2, 64, 14, 13), (16, 64, 1, 1), 0, 1, True),  # ConvNeXt-atto's fc2
        ((2, 64, 14, 13), (16, 64, 1, 1), 0, 1, False),
        ((2, 16, 14, 13), (16, 1, 3, 3), 1, 16, True),  # a depthwise branch
    ],
)
def test_a_convolution_adds_a_residual_with_its_scale_folded_in(
    scale: bool, shape, weight, padding: int, groups: int, channels_last: bool
) -> None:
    """``residual + scale * conv(x)`` in eager inference, with the add in oneDNN's epilogue (the scale folded into a
    copy of the weights, made again when the scale changes) or in place: the float64 values within float32
    rounding, in the input's memory format; with autograd on, the plain ops."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt)
    w, b = torch.randn(weight) / weight[1] ** 0.5, torch.randn(weight[0])
    r = torch.randn(shape[0], weight[0], *shape[2:]).contiguous(memory_format=fmt)
    gamma = nn.Parameter(torch.rand(weight[0]) + 0.5) if scale else None
    args = ((1, 1), (padding, padding), (1, 1), groups)

    def expected() -> torch.Tensor:
        y = F.conv2d(x.double(), w.double(), b.double(), *args)
        return r.double() + (y if gamma is None else y * gamma.double().view(1, -1, 1, 1))

    for kernel in ("fused", "plain"):
        with torch.no_grad(), forcing(kernel):
            got = conv2d(x, w, b, *args, residual=r, scale=gamma)
            torch.testing.assert_close(got.double(), expected(), rtol=1e-5, atol=1e-5, msg=kernel)
            assert got.is_contiguous(memory_format=fmt), kernel
            if gamma is not None:
                gamma.mul_(-1)  # the folded copy follows
                got = conv2d(x, w, b, *args, residual=r, scale=gamma)
                torch.testing.assert_close(got.double(), expected(), rtol=1e-5, atol=1e-5, msg=kernel)
    w.requires_grad_()
    got = conv2d(x, w, b, *args, residual=r, scale=gamma)
    assert got.requires_grad
    torch.testing.assert_close(got.double(), expected(), rtol=1e-5, atol=1e-5)
    linear_module.release_packed()
    assert len(linear_module._SCALED) == 0


@pytest.mark.parametrize(
    ("act", "channels_last", "residual", "op"),
    [
        (nn.GELU(), False, False, True),  # an activation for the epilogue
        (nn.SiLU(), True, False, True),
        (None, True, False, True),  # a packed weight
        (None, False, False, False),  # nothing to gain: inductor's convolution
        (None, True, True, True),  # a residual and a scale for the epilogue
        (None, False, True, False),
        (nn.Tanh(), True, False, False),  # no such post-op
    ],
    ids=str,
)
def test_a_graph_compiled_for_inference_calls_the_eager_kernels_as_one_op(
    act: nn.Module | None, channels_last: bool, residual: bool, op: bool
) -> None:
    """Under torch.compile without gradients a convolution with something to gain (an activation oneDNN has, or a
    map with its channels innermost) is the op ``blockgraph::conv2d_inference``, which runs the eager inference path:
    the float64 values within float32 rounding, in the memory format its fake kernel promises (the strides compared
    with the fake's); the others, and every graph that records gradients, keep torch's convolution. ``aot_eager``
    runs the traced graph eagerly, so the ops it holds show in the profile."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 9, 8).contiguous(memory_format=fmt)
    w, b = torch.randn(32, 16, 3, 3) / 12, torch.randn(32)
    r = torch.randn(2, 32, 9, 8).contiguous(memory_format=fmt) if residual else None
    gamma = torch.rand(32) + 0.5 if residual else None
    args = ((1, 1), (1, 1), (1, 1), 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, w, b, *args, act, r, gamma)

    y = F.conv2d(x.double(), w.double(), b.double(), *args)
    expected = (act or nn.Identity())(y) if r is None else r.double() + y * gamma.double().view(1, -1, 1, 1)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        got = compiled(x)
        called = ops_called(lambda: compiled(x))
    assert ("blockgraph::conv2d_inference" in called) == op, called
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=fmt)
    with torch.no_grad(), FakeTensorMode() as mode:
        fake = torch.ops.blockgraph.conv2d_inference(
            mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b), [1, 1], [1, 1], [1, 1], 1,
            *(post_op(act) or ("none", "")), None if r is None else mode.from_tensor(r),
            None if gamma is None else mode.from_tensor(gamma),
        )  # fmt: skip
    for kernel in ("fused", "plain"):
        with torch.no_grad(), forcing(kernel):
            real = torch.ops.blockgraph.conv2d_inference(
                x, w, b, [1, 1], [1, 1], [1, 1], 1, *(post_op(act) or ("none", "")), r, gamma
            )
        assert (real.shape, real.stride()) == (fake.shape, fake.stride()), kernel
    torch._dynamo.reset()
    if not op:
        return
    w.requires_grad_()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
    assert "blockgraph::conv2d_inference" not in ops_called(lambda: compiled(x))
    torch._dynamo.reset()


def test_a_channels_last_convolution_packs_its_weight_once_and_again_when_it_or_the_map_changes() -> None:
    """The fused kernel reads the weight packed for a channels-last input, made on first use: kept for another
    batch, made again for another map size, an update in place or a ``load_state_dict`` (the values follow); a
    channels-first input reads the plain weight and keeps its format; the copy is dropped where the plain kernel is
    chosen."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 1)
    args = ((1, 1), (0, 0), (1, 1), 1)

    def check(x: torch.Tensor) -> torch.Tensor:
        got = conv2d(x, conv.weight, conv.bias, *args, None)
        torch.testing.assert_close(got, conv(x), rtol=1e-5, atol=1e-5)
        assert got.is_contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)
        return linear_module._PACKED[conv.weight][1] if conv.weight in linear_module._PACKED else None

    x = torch.randn(4, 16, 10, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), forcing("fused"):
        first = check(x)
        assert first is not None and first.is_mkldnn and check(x[:2]) is first  # any batch
        assert check(torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)) is not first
        again = check(x)
        conv.weight.mul_(-1)
        assert check(x) is not again
        conv.load_state_dict(nn.Conv2d(16, 32, 1).state_dict())
        check(x)
        linear_module.release_packed([conv.weight])
        assert check(x.contiguous()) is None  # channels-first: the plain weight
    verdict = ["plain"]

    def measure(candidates: dict, device: torch.device) -> autotune.Choice:
        for call in candidates.values():
            call()
        return autotune.Choice(verdict[0], {}, {}, 1)

    with torch.no_grad(), tuning(True), pytest.MonkeyPatch.context() as patch:
        patch.setattr(autotune, "_measure", measure)
        assert check(x[:3]) is None  # both timed, the plain one chosen: no copy kept
        verdict[0] = "fused"
        assert check(x[:2]) is not None
    autotune.reset()


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
        got = conv_bn(x, conv, bn, act)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if groups == 1 and kernel > 1:  # on the CPU the folded weight is channels-last, so is the map (and the next)
        assert got.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # a 1x1 or depthwise weight has either layout: the map keeps the input's
        got = conv_bn(x.contiguous(memory_format=torch.channels_last), conv, bn, act)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    conv64, bn64 = conv.double(), bn.double()
    with torch.no_grad():
        expected = bn64(conv64(x.double()))
        torch.testing.assert_close(conv_bn(x.double(), conv64, bn64), expected, rtol=0, atol=1e-13)


def test_conv_bn_adds_a_residual_in_place_of_its_output_only() -> None:
    """``residual + act(bn(conv(x)))``: the reference with autograd on, the folded kernel (the add in place on its
    own output) without; the residual itself is never written."""
    conv, bn = _conv_bn()
    x, residual = torch.randn(2, 8, 6, 6), torch.randn(2, 16, 6, 6)
    kept = residual.clone()
    expected = residual + nn.SiLU()(bn(conv(x)))
    torch.testing.assert_close(conv_bn(x, conv, bn, nn.SiLU(), residual), expected, rtol=0, atol=0)
    with torch.no_grad():
        got = conv_bn(x, conv, bn, nn.SiLU(), residual)
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-5)
    assert torch.equal(residual, kept)


def test_the_folded_weights_follow_every_change_of_the_layers() -> None:
    conv, bn = _conv_bn()
    x = torch.randn(2, 8, 6, 6)

    def check() -> None:
        with torch.no_grad():
            torch.testing.assert_close(conv_bn(x, conv, bn), bn(conv(x)), rtol=0, atol=1e-5)

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
    bn.train()(conv(x))  # a training forward: new running statistics (their version counters do not move)
    bn.eval()
    check()
    assert "_blockgraph_folded" not in conv.state_dict() and "_blockgraph_folded" not in dict(conv.named_buffers())


def test_conv_bn_without_running_statistics_runs_the_plain_layers() -> None:
    conv, _ = _conv_bn()
    bn = nn.BatchNorm2d(16, track_running_stats=False).eval()  # normalizes by the batch even in eval
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conv_bn(x, conv, bn), bn(conv(x)), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- merge_depthwise


def _depthwise(channels: int, kernel: int, bias: bool = True, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=bias, **kwargs)


def test_merge_depthwise_equals_the_split_convolutions_and_is_cached_for_inference() -> None:
    torch.manual_seed(0)
    convs = [_depthwise(4, 3), _depthwise(6, 7, bias=False), _depthwise(2, 5)]
    x = torch.randn(2, 12, 9, 11)
    with torch.no_grad():
        expected = torch.cat([c(p) for c, p in zip(convs, torch.split(x, [4, 6, 2], 1), strict=True)], 1)
        weight, bias = merge_depthwise(convs)
        got = F.conv2d(x, weight, bias, padding=3, groups=12)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert merge_depthwise(convs)[0] is weight  # cached (nothing records gradients)
        convs[1].weight.mul_(2.0)  # and remade when a weight changes
        expected = torch.cat([c(p) for c, p in zip(convs, torch.split(x, [4, 6, 2], 1), strict=True)], 1)
        weight, bias = merge_depthwise(convs)
        torch.testing.assert_close(F.conv2d(x, weight, bias, padding=3, groups=12), expected, rtol=0, atol=1e-5)


def test_merge_depthwise_is_differentiable() -> None:
    """With autograd on, the merge is made afresh (not cached) and passes gradients to each convolution's own
    tensors, the padded taps' gradients dropped: the same gradients as the split convolutions, in float64."""
    torch.manual_seed(0)
    convs = [_depthwise(4, 3).double(), _depthwise(6, 7, bias=False).double(), _depthwise(2, 5).double()]
    x = torch.randn(2, 12, 9, 11, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 12, 9, 11, dtype=torch.float64)
    inputs = (x, *(p for c in convs for p in c.parameters()))
    expected = torch.cat([c(p) for c, p in zip(convs, torch.split(x, [4, 6, 2], 1), strict=True)], 1)
    got = F.conv2d(x, *merge_depthwise(convs), padding=3, groups=12)
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
def test_merge_depthwise_refuses_what_it_cannot_merge(odd_one: nn.Conv2d) -> None:
    with pytest.raises(ValueError, match="cannot merge"):
        merge_depthwise([_depthwise(4, 5), odd_one])


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
    got = depthwise_conv2d(x, conv.weight, conv.bias, (1, 1))
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
        got = depthwise_conv2d(x, conv.weight, conv.bias, (1, 1))
        assert "aten::copy_" in ops_called(lambda: conv(x))  # the case this is for
        assert "aten::copy_" not in ops_called(lambda: depthwise_conv2d(x, conv.weight, conv.bias, (1, 1)))
        assert plain.is_contiguous() and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)
        nchw = x.contiguous()
        assert torch.equal(depthwise_conv2d(nchw, conv.weight, conv.bias, (1, 1)), conv(nchw))


# ------------------------------------------------------------------------ depthwise_conv2d's training backward

needs_cpp = pytest.mark.skipif(not _cpp.load(), reason=f"the C++ kernels did not build: {_cpp.failure()}")

BACKWARD_CASES = {  # channels, (kh, kw), (ph, pw), the input's layout
    "7x7 channels-last": (16, (7, 7), (3, 3), "channels_last"),
    "7x7 token map, C % 8 != 0": (13, (7, 7), (3, 3), "tokens"),
    "3x3 NCHW": (8, (3, 3), (1, 1), "nchw"),
    "1x11 band": (12, (1, 11), (0, 5), "channels_last"),
    "11x1 band NCHW": (6, (11, 1), (5, 0), "nchw"),
    "even 4x6, uneven padding": (9, (4, 6), (1, 2), "channels_last"),
    "padding beyond the kernel": (8, (3, 3), (3, 0), "tokens"),
}


def _backward_input(channels: int, layout: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    if layout == "tokens":
        return _token_map(2, channels, 9, 10, dtype=dtype)
    x = torch.randn(2, channels, 9, 10, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@needs_cpp
@pytest.mark.parametrize("kernel", ["blockgraph", "torch", "hybrid"])
@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_depthwise_conv2d_training_gradients_equal_torchs(case: str, kernel: str) -> None:
    """Each backward (forced: torch's, ours, ours with torch's weight gradient) gives the convolution's gradients:
    in float64 within 1e-10 of torch's (input, weight, bias), whatever the kernel's shape, padding and the input's
    layout: through autograd (torch's path records torch's own autograd node, ours the Function) and called
    directly, as CoaT's attention backward calls it (which there times them on first use)."""
    channels, size, padding, layout = BACKWARD_CASES[case]
    torch.manual_seed(0)
    x = _backward_input(channels, layout).requires_grad_()
    weight = torch.randn(channels, 1, *size, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    with forcing(kernel):
        got = depthwise_conv2d(x, weight, bias, padding)
        node = {"torch": "ConvolutionBackward0"}.get(kernel, "_DepthwiseConv2dBackward")
        assert type(got.grad_fn).__name__ == node
        upstream = torch.randn_like(got)
        grads = torch.autograd.grad(got, (x, weight, bias), upstream)
        with torch.no_grad():
            called = depthwise_conv2d_backward(upstream, x.detach(), weight.detach(), padding, (True, True, True))
    expected = F.conv2d(x, weight, bias, padding=padding, groups=channels)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for g, c, e in zip(grads, called, torch.autograd.grad(expected, (x, weight, bias), upstream), strict=True):
        assert g.shape == c.shape == e.shape
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
        torch.testing.assert_close(c, e, rtol=0, atol=1e-10)


def _recorded(y: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``y`` was computed through."""
    names, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    return names


@pytest.mark.parametrize("kernel", ["plain", "linear"])
@pytest.mark.parametrize(("bias", "input_grad"), [(True, True), (False, True), (True, False)])
def test_a_1x1_convolution_trains_as_a_linear_layer_with_the_references_gradients(
    kernel: str, bias: bool, input_grad: bool
) -> None:
    """In an eager training step, a 1x1 convolution of a channels-last map runs either the convolution or the
    oneDNN linear layer's training kernel on the map's [B, h, w, C] view (chosen by measuring; forced here): both
    give the float64 reference's output and gradients to float32 accuracy (the linear one's weight gradient through
    oneDNN's matrix multiply on transposed views, with either operand the wider), the output channels-last, and the
    linear one records the linear layer's autograd node."""
    torch.manual_seed(0)
    for c_in, c_out in ((16, 40), (40, 16)):
        x = torch.randn(2, c_in, 7, 9).contiguous(memory_format=torch.channels_last).requires_grad_(input_grad)
        w = torch.randn(c_out, c_in, 1, 1, requires_grad=True)
        b = torch.randn(c_out, requires_grad=True) if bias else None
        upstream = torch.randn(2, c_out, 7, 9)
        with forcing(kernel):
            y = conv2d(x, w, b, (1, 1), (0, 0), (1, 1), 1, act=nn.GELU())
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert ("_OneDnnLinearBackward" in _recorded(y)) == (kernel == "linear")
        leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, leaves, upstream)
        exact = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b)]
        y64 = F.gelu(F.conv2d(*exact))
        grads64 = torch.autograd.grad(y64, [t for t in exact if t is not None and t.requires_grad], upstream.double())
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, grads64, strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@needs_cpp
def test_depthwise_weight_grad_is_float32_accurate_in_bf16_and_deterministic() -> None:
    """The C++ weight gradient of bf16 maps sums in float32: as close to the float64 gradient as torch's own; and
    its bits do not depend on the number of threads (fixed chunks, no atomics)."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    exact = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), torch.zeros(64, 1, 7, 7, dtype=torch.float64), None, [1, 1], [3, 3], [1, 1],
        False, [0, 0], 64, [False, True, False],
    )[1]  # fmt: skip
    ours = torch.ops.blockgraph_conv.depthwise_weight_grad(grad.bfloat16(), x.bfloat16(), 7, 7, 3, 3)
    theirs = torch.ops.aten.convolution_backward(
        grad.bfloat16(), x.bfloat16(), torch.zeros(64, 1, 7, 7, dtype=torch.bfloat16), None, [1, 1], [3, 3],
        [1, 1], False, [0, 0], 64, [False, True, False],
    )[1]  # fmt: skip
    assert ours.dtype == torch.bfloat16 and ours.shape == (64, 1, 7, 7)
    scale = exact.abs().max()
    assert (ours.double() - exact).abs().max() <= max(1.5 * (theirs.double() - exact).abs().max(), 4e-3 * scale)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.blockgraph_conv.depthwise_weight_grad(grad, x, 7, 7, 3, 3)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.blockgraph_conv.depthwise_weight_grad(grad, x, 7, 7, 3, 3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_cpp
def test_depthwise_weight_grad_refuses_a_gradient_of_the_wrong_shape() -> None:
    x = torch.randn(2, 8, 9, 9)
    with pytest.raises(RuntimeError, match="grad_out is not the output's shape"):
        torch.ops.blockgraph_conv.depthwise_weight_grad(torch.randn(2, 8, 9, 8), x, 3, 3, 1, 1)


@needs_cpp
def test_depthwise_conv2d_second_derivatives_and_autocast() -> None:
    """A gradient of the gradient (create_graph: torch's differentiable backward) equals the plain layer's; under
    bf16 autocast the convolution runs in bf16 as ``F.conv2d`` does there, and the float32 parameters get float32
    gradients equal to the plain layer's under the same autocast (to bf16 rounding)."""
    torch.manual_seed(0)
    conv = _depthwise(16, 7).double()
    x = _backward_input(16, "channels_last").requires_grad_()
    (gx,) = torch.autograd.grad(
        depthwise_conv2d(x, conv.weight, conv.bias, (3, 3)).square().sum(), x, create_graph=True
    )
    got = torch.autograd.grad(gx.square().sum(), conv.weight)[0]
    (gx,) = torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
    torch.testing.assert_close(got, torch.autograd.grad(gx.square().sum(), conv.weight)[0], rtol=0, atol=1e-10)

    conv = _depthwise(16, 7)
    x = _backward_input(16, "channels_last", torch.float32)
    for kernel in ("blockgraph", "hybrid"):
        with torch.autocast("cpu", dtype=torch.bfloat16), forcing(kernel):
            got = depthwise_conv2d(x, conv.weight, conv.bias, (3, 3))
            expected = conv(x)
        assert got.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        upstream = torch.randn_like(got)
        grads = torch.autograd.grad(got, (conv.weight, conv.bias), upstream)
        for g, e in zip(grads, torch.autograd.grad(expected, (conv.weight, conv.bias), upstream), strict=True):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2 * e.abs().max().item())


@needs_cpp
def test_a_7x7_depthwise_backward_is_chosen_by_measuring() -> None:
    """The first forward of a shape in training times a forward and a backward of torch's path and ours and keeps
    the choice (per shape, dtype, layout), recording that path's autograd node; the next forward reuses it without
    measuring, and under autocast the choice is the one for the dtype the convolution runs in."""
    conv = _depthwise(8, 7)
    x = torch.randn(2, 8, 13, 17).contiguous(memory_format=torch.channels_last).requires_grad_()  # (a shape no other
    # test uses: the choice is made here)

    def keys() -> list[tuple]:
        return [k for k in choices() if k[0] == "depthwise_conv2d_train" and k[1] == tuple(x.shape)]

    nodes = {
        "torch": "ConvolutionBackward0",
        "blockgraph": "_DepthwiseConv2dBackward",
        "hybrid": "_DepthwiseConv2dBackward",
    }
    with tuning(True):
        y = depthwise_conv2d(x, conv.weight, conv.bias, (3, 3))
        assert len(keys()) == 1 and conv.weight.grad is None  # (timed on detached copies)
        choice = choices()[keys()[0]]
        assert set(choice.seconds) == {"blockgraph", "torch", "hybrid"} and all(t > 0 for t in choice.seconds.values())
        assert type(y.grad_fn).__name__ == nodes[choice.chosen]
        y.sum().backward()
        y = depthwise_conv2d(x, conv.weight, conv.bias, (3, 3))
        assert type(y.grad_fn).__name__ == nodes[choice.chosen] and choices()[keys()[0]] is choice
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = depthwise_conv2d(x, conv.weight, conv.bias, (3, 3))
            assert len(keys()) == 2 and {k[4] for k in keys()} == {torch.float32, torch.bfloat16}
            bf16 = choices()[next(k for k in keys() if k[4] == torch.bfloat16)].chosen
            assert type(y.grad_fn).__name__ == nodes[bf16] and y.dtype == torch.bfloat16


def test_a_checkpointed_recomputation_takes_the_path_its_forward_took() -> None:
    """The path is chosen at the forward: activation checkpointing's recomputation (during the backward) records
    the same tensors as the forward it repeats, and the gradients are the plain ones."""
    from torch.utils.checkpoint import checkpoint

    conv = _depthwise(8, 3)
    x = torch.randn(2, 8, 11, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    with tuning(True):
        y = checkpoint(lambda t: depthwise_conv2d(t, conv.weight, conv.bias, (1, 1)).relu(), x, use_reentrant=False)
        y.sum().backward()
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1, groups=8).relu()
    (gx,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)


@needs_cpp
def test_a_compiled_training_graph_runs_our_backward() -> None:
    """Under torch.compile (fullgraph) a depthwise convolution that records gradients is the op
    ``blockgraph::depthwise_conv2d``, whose traced backward calls the C++ weight gradient (7x7: ours by default);
    the gradients are the eager layer's (float64, 1e-10). ``aot_eager`` runs the traced graphs without inductor."""
    from blockgraph.layers.primitives import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(16, 16, (7, 7), padding=(3, 3), groups=16).double()
    x = _backward_input(16, "channels_last").requires_grad_()

    def loss(x: torch.Tensor) -> torch.Tensor:
        return conv(x).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    called = ops_called(lambda: torch.autograd.grad(compiled(x), (x, conv.weight, conv.bias)))
    assert {"blockgraph::depthwise_conv2d", "blockgraph_conv::depthwise_weight_grad"} <= called
    got = torch.autograd.grad(compiled(x), (x, conv.weight, conv.bias))
    expected = torch.autograd.grad(F.conv2d(x, conv.weight, conv.bias, padding=3, groups=16).square().sum(),
                                   (x, conv.weight, conv.bias))  # fmt: skip
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    torch._dynamo.reset()
