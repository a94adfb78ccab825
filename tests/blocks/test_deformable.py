"""Deformable encoder primitives: MSDeformAttn with padding masks and 4-d boxes against independent math, its
initialization, the sine embedding, and the encoder's parameter count."""

from __future__ import annotations

import math

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
