"""Deformable encoder primitives: MSDeformAttn with padding masks and 4-d boxes against independent math, its
initialization, the sine embedding, the encoder's parameter count, and the model input of a padding mask (the
encoder's bookkeeping in float64 against Deformable-DETR's, the padded region kept out of the valid tokens)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import blockgraph as bg
from tests.conftest import ROOT


def _bilinear(value: torch.Tensor, h: int, w: int, x: float, y: float) -> torch.Tensor:
    """Zero-padded bilinear sample of one level ``[h*w, D]`` at normalized (x, y), align_corners=False."""
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value.shape[-1], dtype=value.dtype)
    for yy, wy in ((y0, y0 + 1 - py), (y0 + 1, py - y0)):
        for xx, wx in ((x0, x0 + 1 - px), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * value[yy * w + xx]
    return out


def _expected(attn, query, ref, src, shapes, mask) -> torch.Tensor:
    """MSDeformAttn written out sample by sample from ARCHITECTURES.md 6.5 (no ops, no vectorized sampling)."""
    N, Lq, C = query.shape
    M, L, P = attn.heads, attn.levels, attn.points
    D = C // M
    value = src @ attn.value_proj.weight.T + attn.value_proj.bias
    value = value.masked_fill(mask[..., None], 0.0).view(N, -1, M, D)
    offsets = (query @ attn.sampling_offsets.weight.T + attn.sampling_offsets.bias).view(N, Lq, M, L, P, 2)
    logits = (query @ attn.attention_weights.weight.T + attn.attention_weights.bias).view(N, Lq, M, L * P)
    weights = logits.softmax(-1).view(N, Lq, M, L, P)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(N, Lq, M, D, dtype=query.dtype)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for lv, (h, w) in enumerate(shapes):
                    level = value[n, starts[lv] : starts[lv] + h * w, m]
                    for p in range(P):
                        dx, dy = offsets[n, q, m, lv, p].tolist()
                        r = ref[n, q, lv].tolist()
                        if len(r) == 2:
                            x, y = r[0] + dx / w, r[1] + dy / h
                        else:
                            x, y = r[0] + dx / P * r[2] * 0.5, r[1] + dy / P * r[3] * 0.5
                        out[n, q, m] += weights[n, q, m, lv, p] * _bilinear(level, h, w, x, y)
    return out.view(N, Lq, C) @ attn.output_proj.weight.T + attn.output_proj.bias


@pytest.mark.parametrize("box", [False, True], ids=["points", "boxes"])
def test_msdeformattn_with_padding_and_boxes_matches_the_written_out_math(box: bool) -> None:
    from blockgraph.layers.deformable import MSDeformAttn

    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    attn = MSDeformAttn(dim=8, levels=2, heads=2, points=2).double()
    with torch.no_grad():  # non-trivial projections (the init zeroes some)
        for p in attn.parameters():
            p.normal_(0, 0.5)
    S = sum(h * w for h, w in shapes)
    query, src = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, S, 8, dtype=torch.float64)
    ref = torch.rand(2, 3, 2, 4 if box else 2, dtype=torch.float64)
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[1, 3:7] = True  # some padded keys in the second sample
    spatial = torch.tensor(shapes)
    starts = torch.tensor([0, shapes[0][0] * shapes[0][1]])
    with torch.no_grad():
        got = attn(query, ref, src, spatial, starts, mask)
    torch.testing.assert_close(got, _expected(attn, query, ref, src, shapes, mask), rtol=0, atol=1e-10)


def test_msdeformattn_initialization() -> None:
    from blockgraph.layers.deformable import MSDeformAttn

    attn = MSDeformAttn(dim=256, levels=4, heads=8, points=4)
    bias = attn.sampling_offsets.bias.view(8, 4, 4, 2)
    directions = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32
    )
    for p in range(4):  # the ideal directions, up to the float32 residues of cos/sin (ARCHITECTURES.md 6.5)
        torch.testing.assert_close(bias[:, 2, p], directions * (p + 1), rtol=1e-6, atol=1e-6)
    # computed with float32 operations as the original, not hard-coded: cos(pi/2) leaves a residue, not 0
    assert bias[2, 0, 0, 0] != 0 and abs(bias[2, 0, 0, 0]) < 1e-6
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0


def test_sine_embedding_matches_the_formulas() -> None:
    from blockgraph.layers.deformable import sine_position_embedding

    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, :, 3] = True  # the last column is padding
    for temperature, offset in (((20.0, 20.0), 0.0), ((10000.0, 10000.0), -0.5)):
        pos = sine_position_embedding(mask, features=4, temperature=temperature, offset=offset)
        assert pos.shape == (1, 8, 3, 4)
        i, j = 1, 2  # row 1, column 2 of a 3-row, 3-valid-column map
        y = (i + 1 + offset) / (3 + 1e-6) * 2 * math.pi
        x = (j + 1 + offset) / (3 + 1e-6) * 2 * math.pi
        expected = []
        for value, t in ((y, temperature[0]), (x, temperature[1])):
            expected += [math.sin(value), math.cos(value), math.sin(value / t**0.5), math.cos(value / t**0.5)]
        torch.testing.assert_close(pos[0, :, i, j], torch.tensor(expected), rtol=0, atol=1e-5)


def test_dino_encoder_parameter_count() -> None:
    """ARCHITECTURES.md 6.9: six layers (FFN 2048) plus the level embedding: 7,694,080."""
    model = bg.build_model(ROOT / "specs" / "deformable_encoder.yaml", device="meta")
    assert sum(p.numel() for p in model.get_submodule("encoder").parameters()) == 7_694_080


def test_the_encoder_memory_is_the_levels_maps() -> None:
    torch.manual_seed(0)
    path = ROOT / "specs" / "deformable_encoder.yaml"
    model = bg.build_model(path, overrides={"layers": 1}, outputs=["memory", "l0", "l3"]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 130))
    h0, w0 = 12, 17  # ceil(96 / 8), ceil(130 / 8)
    assert out["memory"].shape == (1, 12 * 17 + 6 * 9 + 3 * 5 + 2 * 3, 256)
    torch.testing.assert_close(out["l0"].flatten(2).transpose(1, 2), out["memory"][:, : h0 * w0], rtol=0, atol=0)
    torch.testing.assert_close(out["l3"].flatten(2).transpose(1, 2), out["memory"][:, -6:], rtol=0, atol=0)


def test_validate_derives_the_dino_levels_and_token_total(run_cli) -> None:
    """ARCHITECTURES.md 6.10: a 640x701 image gives levels 80x88, 40x44, 20x22, 10x11 and S = 9350, statically."""
    import json

    code, out, err = run_cli("validate", ROOT / "specs" / "deformable_encoder.yaml", "--input", "3x640x701", "--json")
    assert code == 0, err
    outputs = json.loads(out)["outputs"]
    assert outputs == {
        "memory": "1x9350x256",
        "l0": "1x256x80x88",
        "l1": "1x256x40x44",
        "l2": "1x256x20x22",
        "l3": "1x256x10x11",
    }


# ------------------------------------------------------------------------------------------------ padding masks

HYBRID = ROOT / "specs" / "coat_lite_small_deformable.yaml"


def _padded_batch(h: int = 96, w: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images padded to one size, DETR style: the first fills 80x96 of it, the second all of it."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, h, w, dtype=torch.float64, generator=g)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[0, 80:, :] = True
    mask[0, :, 96:] = True
    images[0][:, mask[0]] = 0.0
    return images, mask


def _hybrid(**overrides: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return bg.build_model(HYBRID, overrides={"depths": [1, 1, 1, 1], "enc_layers": 2, **overrides}).double().eval()


def _encoder_inputs(model: torch.nn.Module, *args: Any) -> tuple[torch.Tensor, ...]:
    seen: list[tuple[torch.Tensor, ...]] = []
    handle = model.get_submodule("encoder").register_forward_pre_hook(lambda _, a: seen.append(a))
    with torch.no_grad():
        model(*args)
    handle.remove()
    return seen[0]


def _reference_encoder(encoder: torch.nn.Module, srcs: list[torch.Tensor], image_mask: torch.Tensor) -> torch.Tensor:
    """Deformable-DETR's encoder bookkeeping written out in float64 (its ``get_valid_ratio`` and
    ``get_reference_points``, DINO's PositionEmbeddingSineHW with temperature 20, DETR's nearest mask resize), the
    layers run as they are (MSDeformAttn is checked against the sampling math above): the memory ``[B, S, C]``."""
    f64 = torch.float64
    masks = [
        torch.nn.functional.interpolate(image_mask[None].to(f64), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs
    ]
    flat, pos_flat, mask_flat, shapes, ratios = [], [], [], [], []
    for level, (src, mask) in enumerate(zip(srcs, masks, strict=True)):
        _, _, h, w = src.shape
        shapes.append((h, w))
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=f64) / (not_mask.cumsum(1, dtype=f64)[:, -1:, :] + 1e-6) * 2 * math.pi
        x_embed = not_mask.cumsum(2, dtype=f64) / (not_mask.cumsum(2, dtype=f64)[:, :, -1:] + 1e-6) * 2 * math.pi
        dim_t = 20.0 ** (2 * (torch.arange(128, dtype=f64) // 2) / 128)
        pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        flat.append(src.flatten(2).transpose(1, 2))
        pos_flat.append(pos.flatten(2).transpose(1, 2) + encoder.level_embed[level].view(1, 1, -1))
        mask_flat.append(mask.flatten(1))
        valid_h, valid_w = torch.sum(~mask[:, :, 0], 1), torch.sum(~mask[:, 0, :], 1)
        ratios.append(torch.stack([valid_w.to(f64) / w, valid_h.to(f64) / h], -1))
    valid_ratios = torch.stack(ratios, 1)
    points = []
    for level, (h, w) in enumerate(shapes):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=f64), torch.linspace(0.5, w - 0.5, w, dtype=f64), indexing="ij"
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference = torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]
    spatial = torch.as_tensor(shapes, dtype=torch.long)
    start = torch.cat((spatial.new_zeros((1,)), spatial.prod(1).cumsum(0)[:-1]))
    out, pos, padding = torch.cat(flat, 1), torch.cat(pos_flat, 1), torch.cat(mask_flat, 1)
    for layer in encoder.layers:
        out = layer(out, pos, reference, spatial, start, padding)
    return out


def test_the_hybrid_with_a_padding_mask_equals_the_written_out_encoder_in_float64() -> None:
    """With the image's padding mask the encoder computes its position embedding and reference points in the
    model's dtype: float64 runs agree with the float64 reference to 1e-12 (in float32 they could not: 1e-7)."""
    model = _hybrid()
    images, mask = _padded_batch()
    *srcs, given = _encoder_inputs(model, images, mask)
    assert torch.equal(given, mask)
    with torch.no_grad():
        got = model(images, mask)
        expected = _reference_encoder(model.get_submodule("encoder"), srcs, mask)
        memory = model.get_submodule("encoder")(*srcs, given)[0]
    torch.testing.assert_close(memory, expected, rtol=0, atol=1e-12)
    sizes = [s.shape[-2] * s.shape[-1] for s in srcs]
    assert got["p3"].flatten(2).transpose(1, 2).equal(memory[:, : sizes[0]])


def test_the_padded_region_does_not_change_the_valid_tokens() -> None:
    """What the levels hold where the image is padding never reaches a valid token (float64, exact to 1e-12); an
    all-false mask is no mask; and the mask does change the valid tokens (they attend within the valid region)."""
    model = _hybrid()
    encoder = model.get_submodule("encoder")
    images, mask = _padded_batch()
    *srcs, _ = _encoder_inputs(model, images, mask)
    levels = [torch.nn.functional.interpolate(mask[None].double(), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs]
    noisy = [s + 10 * torch.randn_like(s) * m[:, None] for s, m in zip(srcs, levels, strict=True)]
    valid = torch.cat([~m.flatten(1) for m in levels], 1)  # [B, S]
    with torch.no_grad():
        clean, dirty = encoder(*srcs, mask)[0], encoder(*noisy, mask)[0]
        torch.testing.assert_close(dirty[valid], clean[valid], rtol=0, atol=1e-12)
        assert (dirty[~valid] - clean[~valid]).abs().max() > 1e-3  # the padded tokens themselves do change
        none, unpadded = encoder(*srcs)[0], encoder(*srcs, torch.zeros_like(mask))[0]
        torch.testing.assert_close(unpadded, none, rtol=0, atol=1e-12)
        assert (clean[0][valid[0]] - none[0][valid[0]]).abs().max() > 1e-3
        torch.testing.assert_close(clean[1], none[1], rtol=0, atol=1e-12)  # the unpadded image of the batch
        torch.testing.assert_close(model(images)["p3"], model(images, None)["p3"], rtol=0, atol=0)
        by_name = model(image=images, mask=mask)["p3"]  # forward takes the inputs by their names
        torch.testing.assert_close(by_name, model(images, mask)["p3"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.zeros(2, 96, 128), "booleans of shape \\[2, 96, 128\\].*got torch.float32 of shape \\[2, 96, 128\\]"),
        (torch.zeros(1, 96, 128, dtype=torch.bool), "got torch.bool of shape \\[1, 96, 128\\]"),
        (torch.zeros(2, 48, 64, dtype=torch.bool), "got torch.bool of shape \\[2, 48, 64\\]"),
    ],
)
def test_a_mask_that_does_not_fit_the_image_is_refused(mask: torch.Tensor, message: str) -> None:
    model = bg.build_model(HYBRID, overrides={"depths": [1, 1, 1, 1], "enc_layers": 1}, device="meta")
    with pytest.raises(bg.ShapeError, match=message) as info:
        model(torch.empty(2, 3, 96, 128, device="meta"), mask.to("meta"))
    assert info.value.node == "mask"


def test_a_mask_on_another_device_than_the_image_is_refused() -> None:
    model = bg.build_model(HYBRID, overrides={"depths": [1, 1, 1, 1], "enc_layers": 1}, device="meta")
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)  # on the CPU, the image on meta
    with pytest.raises(bg.ShapeError, match="on the image's device \\(meta\\), got it on cpu") as info:
        model(torch.empty(2, 3, 96, 128, device="meta"), mask)
    assert info.value.node == "mask" and "mask.to('meta')" in str(info.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("  - name: encoder\n", "  - {name: bad, op: act, kind: relu, from: mask}\n  - name: encoder\n"),
         "op 'act' does not take a padding mask"),
        (("proj5, mask]", "mask, proj5]"), "a padding mask must come last in `from:`"),
        (("  mask: {kind: mask, optional: true}", "  mask: {kind: mask, optional: true}\n  other: {channels: 1}"),
         "`inputs:` needs exactly one image .*got 2: image, other"),
        (("input: null ", "input: {size: [64, 64]} "), "give `input:` \\(one image\\) or `inputs:`"),
        (("image: {channels: 3", "image: {optional: true, channels: 3"), "only a mask input can be optional"),
        (("  mask: {kind: mask,", "  mask: {name: msk, kind: mask,"), "input 'mask' is named by its key"),
    ],
)  # fmt: skip
def test_inputs_are_checked_statically(edit: tuple[str, str], message: str) -> None:
    text = HYBRID.read_text()
    assert edit[0] in text
    with pytest.raises(bg.BlockgraphError, match=message):
        bg.validate(
            text.replace(*edit, 1).replace(
                "extends: coat_lite_small.yaml", f"extends: {ROOT}/specs/coat_lite_small.yaml"
            )
        )
