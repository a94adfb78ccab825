"""Each speed-up in the blocks is guarded by an equivalence test against the plain math it replaces, so that no
later change can trade exactness for speed: Swin's window attention with a cached bias and mask, CoaT's CRPE without
zero rows, ViT's SDPA attention, the deformable encoder's per-size layout cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)

import blockgraph as bg
from blockgraph.layers.coat import ConvRelPosEnc, FactorAttnConvRelPosEnc
from blockgraph.layers.swin import SwinBlock, WindowAttention, shift_mask
from blockgraph.layers.vit import Attention
from tests.conftest import ROOT


def _seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.1) (biases and tables included, so that nothing is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


# ------------------------------------------------------------------------------------------------------------ Swin


def _window_attention_plain(attn: WindowAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """timm's manual path: (q * scale) k^T + table[index] (+ mask per window) → softmax → @ v → proj."""
    Bw, N, C = x.shape
    h = attn.heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(Bw, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(N, N, h).permute(2, 0, 1)
    logits = logits + bias
    if mask is not None:
        logits = (logits.view(-1, mask.shape[0], h, N, N) + mask[None, :, None]).view(Bw, h, N, N)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(Bw, N, C)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("shift", [0, 3])
def test_swin_attention_equals_the_plain_math_cached_or_not(shift: int) -> None:
    torch.manual_seed(0)
    attn = _seeded(WindowAttention(32, 4, 7)).eval()
    h = w = 14
    mask = shift_mask(h, w, 7, shift) if shift else None
    x = torch.randn(2 * 4, 49, 32)  # a batch of 2, 4 windows each
    expected = _window_attention_plain(attn, x, mask)
    with torch.no_grad():
        first = attn(x, mask, (h, w, shift))
        again = attn(x, mask, (h, w, shift))
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-5)
    assert torch.equal(first, again)
    assert len(attn._bias_cache) == 1
    got = attn(x, mask, (h, w, shift))  # with autograd on: no cache, the same result
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_swin_bias_cache_follows_the_table_and_gradients_reach_it() -> None:
    attn = _seeded(WindowAttention(16, 2, 7))
    x = torch.randn(4, 49, 16)
    mask = shift_mask(14, 14, 7, 3)
    with torch.no_grad():
        attn(x, mask, (14, 14, 3))
        attn.relative_position_bias_table.mul_(3.0)  # as an optimizer step or load_state_dict would
        after = attn(x, mask, (14, 14, 3))
    torch.testing.assert_close(after, _window_attention_plain(attn, x, mask), rtol=0, atol=1e-5)
    attn.relative_position_bias_table.grad = None
    attn(x, mask, (14, 14, 3)).square().sum().backward()
    ours = attn.relative_position_bias_table.grad.clone()
    attn.relative_position_bias_table.grad = None
    _window_attention_plain(attn, x, mask).square().sum().backward()
    torch.testing.assert_close(ours, attn.relative_position_bias_table.grad, rtol=1e-4, atol=1e-5)


def test_swin_block_in_training_equals_eval_without_dropout() -> None:
    block = _seeded(SwinBlock(32, 4, 7, shift=3))
    x = torch.randn(2, 14 * 14, 32)
    trained = block.train()(x, (14, 14))
    with torch.no_grad():
        evaluated = block.eval()(x, (14, 14))
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=1e-5)


def test_swin_block_keeps_the_mask_of_its_build_size_as_a_buffer() -> None:
    """The built size's mask is a non-persistent buffer (an input under torch.compile, not traced ops), equal to
    ``shift_mask`` (checked against its definition in test_swin_mobilevit.py); another size makes its own, and both
    give the same block output as a block built without."""
    torch.manual_seed(0)
    block = _seeded(SwinBlock(32, 4, 7, shift=3, size=(14, 21))).eval()
    plain = SwinBlock(32, 4, 7, shift=3).eval()
    plain.load_state_dict(block.state_dict())
    assert "attn_mask" not in block.state_dict()
    assert torch.equal(block.attn_mask, shift_mask(14, 21, 7, 3))
    assert block._mask(14, 21, (3, 3), block.attn_mask.device) is block.attn_mask
    assert plain.attn_mask is None and SwinBlock(32, 4, 7, shift=3, size=(7, 7)).attn_mask is None  # one window
    for h, w in [(14, 21), (21, 14)]:
        x = torch.randn(2, h * w, 32)
        with torch.no_grad():
            torch.testing.assert_close(block(x, (h, w)), plain(x, (h, w)), rtol=0, atol=0)
        torch.testing.assert_close(block.train()(x, (h, w)), plain.train()(x, (h, w)), rtol=0, atol=0)
        block.eval()
        plain.eval()
    assert list(block._masks) == [(21, 14, (3, 3), "cpu")]


# ------------------------------------------------------------------------------------------------------------ CoaT


@pytest.mark.parametrize("extra", [0, 1])
def test_factor_attention_with_crpe_equals_the_zero_padded_formula(extra: int) -> None:
    """``scale * q (softmax_N(k)^T v) + pad(CRPE)`` with the zero rows written out, as timm computes it."""
    torch.manual_seed(0)
    crpe = _seeded(ConvRelPosEnc(32, 4, {3: 2, 5: 2}), 1)
    attn = _seeded(FactorAttnConvRelPosEnc(32, 4), 2)
    H, W = 5, 6
    x = torch.randn(2, extra + H * W, 32, requires_grad=True)
    got = attn(x, (H, W), crpe)
    B, N, C = x.shape
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
    factor = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)
    v_img = v[:, :, extra:].transpose(-1, -2).reshape(B, 32, H, W)
    parts = torch.split(v_img, [16, 16], dim=1)
    conv_v = torch.cat([F.conv2d(p, c.weight, c.bias, padding=c.padding, groups=16) for p, c in
                        zip(parts, crpe.conv_list, strict=True)], 1)  # fmt: skip
    term = q[:, :, extra:] * conv_v.reshape(B, 4, 8, H * W).transpose(-1, -2)
    padded = torch.cat([torch.zeros(B, 4, extra, 8), term], dim=2)
    expected = (attn.scale * factor + padded).transpose(1, 2).reshape(B, N, C) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the windows run as one conv with zero-padded kernels: gradients still reach each window's own weight and bias
    inputs = (x, *crpe.parameters(), *attn.parameters())
    grads_got = torch.autograd.grad(got.square().sum(), inputs)
    grads_expected = torch.autograd.grad(expected.square().sum(), inputs)
    for g, e in zip(grads_got, grads_expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_crpe_refuses_even_windows() -> None:
    """Its windows run as one conv with kernels padded around their centers: an even kernel has none."""
    with pytest.raises(ValueError, match="odd"):
        ConvRelPosEnc(32, 4, {3: 2, 4: 2})


# ------------------------------------------------------------------------------------------------------------- ViT


def test_vit_attention_through_sdpa_equals_softmax_attention() -> None:
    attn = _seeded(Attention(48, 6)).eval()
    x = torch.randn(3, 17, 48)
    B, N, C = x.shape
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(B, N, 3, 6, 8).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * 8**-0.5).softmax(-1)
    expected = (weights @ v).transpose(1, 2).reshape(B, N, C) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ deformable


def test_deformable_encoder_layout_cache_equals_the_padded_path_without_padding() -> None:
    """Without masks the encoder reuses its per-size layout; it must give what the general (padding-mask) path
    gives with all-False masks, at two sizes and on repeated calls."""
    torch.manual_seed(0)
    model = bg.build_model(ROOT / "specs" / "deformable_encoder.yaml", overrides={"layers": 2}, outputs=["memory"])
    encoder = _seeded(model.get_submodule("encoder"), 3).eval()
    for sizes in ([(12, 17), (6, 9), (3, 5), (2, 3)], [(8, 8), (4, 4), (2, 2), (1, 1)]):
        srcs = [torch.randn(2, 256, h, w) for h, w in sizes]
        masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in sizes]
        with torch.no_grad():
            general = encoder(*srcs, masks=masks)
            cached = encoder(*srcs)
            again = encoder(*srcs)
        for a, b, c in zip(general, cached, again, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
            assert torch.equal(b, c)
    assert len(encoder._layouts) == 2


# ---------------------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "coat_lite_tiny", "swin_tiny_patch4_window7_224"])
def test_linear_layers_get_their_init_once_on_the_requested_device(name: str) -> None:
    """Linear layers are made without PyTorch's default init (common.uninitialized) and drawn once from trunc_normal(0.02)
    with zero bias: every one is initialized, none is left as uninitialized memory, all on the CPU."""
    torch.manual_seed(0)
    model = bg.create_model(name)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    for layer in linears:
        assert abs(layer.weight.detach().std().item() - 0.02) < 0.004
        assert layer.bias is None or not layer.bias.detach().any()


@pytest.mark.parametrize(
    ("cls", "args", "kwargs"),
    [
        (torch.nn.Linear, (8, 4), {"bias": False}),
        (torch.nn.Linear, (8, 4), {"dtype": torch.float64}),
        (torch.nn.Conv2d, (8, 16, 3, 2, 1), {"groups": 2, "bias": False}),
    ],
)
def test_uninitialized_layers_are_the_real_class_with_the_same_state(cls, args, kwargs) -> None:
    """common.uninitialized gives exactly the torch class (no subclass left behind), with the same attributes,
    parameters and buffers as the normal constructor; only the drawing is skipped."""
    from blockgraph.layers.common import uninitialized

    layer, normal = uninitialized(cls, *args, **kwargs), cls(*args, **kwargs)
    assert type(layer) is cls
    assert vars(layer).keys() == vars(normal).keys() and repr(layer) == repr(normal)
    got, expected = layer.state_dict(), normal.state_dict()
    assert got.keys() == expected.keys()
    assert all(got[k].shape == expected[k].shape and got[k].dtype == expected[k].dtype for k in got)


def test_conv2d_with_its_own_init_draws_every_parameter() -> None:
    """conv.conv2d skips PyTorch's default init: the weight gets the fan-out normal and a bias is zeroed, so no
    parameter is left as uninitialized memory."""
    from blockgraph.layers.conv import conv2d

    torch.manual_seed(0)
    conv = conv2d(16, 32, 3, padding=1, bias=True, init="fan_out")
    assert type(conv) is torch.nn.Conv2d and not conv.bias.detach().any()
    assert abs(conv.weight.detach().std().item() - (2.0 / (9 * 32)) ** 0.5) < 0.01
