"""Swin and MobileViT specifics: static window/patch rules, the shift mask, and a hybrid across both families."""

from __future__ import annotations

import pytest
import torch

import blockgraph as bg
from tests.conftest import ROOT

HYBRID = """
name: mv2_swin
input: {channels: 3, size: [224, 224]}
stages:
  - name: stem
    blocks:
      - {name: conv, op: conv_bn, dim_out: 16, kernel: 3, stride: 2, act: silu}
  - name: mv2
    blocks:
      - {name: ir, op: mv2_block, depth: 2, dim_out: 24, stride: "${2 if rep == 0 else 1}", expansion: 2}
      - {name: down, op: mv2_block, dim_out: 48, stride: 2, expansion: 2}
      - {name: tokens, op: map_to_tokens}
  - name: swin
    blocks:
      - {name: blocks, op: swin_block, depth: 2, dim: 48, heads: 3, window: 7, shift: "${3 if rep % 2 else 0}"}
      - {name: merge, op: patch_merging, dim: 48}
      - {name: blocks2, op: swin_block, depth: 2, dim: 96, heads: 6, window: 7, shift: "${3 if rep % 2 else 0}"}
blocks:
  - {name: head, op: cls_head, dim: 96, num_classes: 10, pool: avg, norm_eps: 1.0e-5}
outputs: {logits: head}
"""


def test_a_mobilevit_swin_hybrid_validates_builds_and_trains() -> None:
    report = bg.validate(HYBRID)
    # stride-2 convs round up, so ceil(H / 8) must be a multiple of 7 (and the merged map too)
    assert report.accepted == ["H in {112k, 112k+105..112k+111}", "W in {112k, 112k+105..112k+111}"]
    torch.manual_seed(0)
    model = bg.build_model(HYBRID)
    x = torch.randn(2, 3, 224, 336)
    types = model.node_types()
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, tuple(o.shape)))
        for n in model.nodes
    ]
    out = model(x)
    for handle in hooks:
        handle.remove()
    assert seen == {n: t.shape({"H": 224, "W": 336}, batch=2) for n, t in types.items()}
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():  # leave the zero inits (MV2's last BN), then every parameter moves the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
            p.grad = None
    model(x).square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_swin_rejects_a_size_its_windows_do_not_divide(run_cli) -> None:
    code, _, err = run_cli("validate", ROOT / "specs" / "swin_tiny_patch4_window7_224.yaml", "--input", "3x256x256")
    assert code == 2
    first = err.splitlines()[0]
    assert "node 'layers0.blocks.0'" in first and "not divisible by the window 7" in first and "H//4 = 64" in first
    assert "H in {224k, 224k+1, 224k+2, 224k+3}, H >= 224" in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 4  # one per stage, not per block


def test_swin_with_pad_takes_any_size_and_merging_without_pad_refuses_odd_maps(run_cli) -> None:
    code, out, _ = run_cli("validate", "swin_tiny_patch4_window7_224", "--set", "pad=true", "--input", "3x252x332")
    assert code == 0 and "accepts: any H, W >= 4" in out and "layers3 1x768x8x11" in out
    code, _, err = run_cli("validate", "swin_tiny_patch4_window7_224", "--input", "3x252x332")
    assert code == 2 and "hint: `pad: true` pads the map to a multiple of the window" in err
    spec = (
        "name: m\ninput: {size: [36, 36]}\nblocks:\n"
        "  - {name: embed, op: conv_patch_embed, dim: 8, patch: 4}\n"
        "  - {name: merge, op: patch_merging, dim: 8, pad: false}\n"
    )
    with pytest.raises(bg.ShapeError, match=r"the map height \(H//4\) is odd") as info:
        bg.validate(spec)
    assert "`pad: true` pads an odd map" in (info.value.hint or "")
    assert bg.validate(spec.replace("pad: false", "pad: true")).name == "m"


def test_mobilevit_takes_any_size_or_with_interpolate_false_refuses_one_its_patches_do_not_divide(run_cli) -> None:
    code, out, _ = run_cli("validate", ROOT / "specs" / "mobilevit_s.yaml", "--input", "3x288x256")
    assert code == 0 and "accepts: any H, W >= 1" in out  # resized to a multiple of the patch, as timm
    text = (
        (ROOT / "specs" / "mobilevit.yaml")
        .read_text()
        .replace("op: mobilevit_block", "op: mobilevit_block\n        interpolate: false")
    )
    spec = f"{text}\nvariant: s\n"
    with pytest.raises(bg.ShapeError) as info:
        bg.validate(spec, input_size=(3, 288, 256))
    assert "not divisible by the patch 2" in str(info.value) and "stage4.mvit" in str(info.value)
    assert "H in {64k, 64k+57..64k+63}" in str(info.value) and "interpolate: true" in str(info.value)


@pytest.mark.parametrize(("size", "shifts"), [((224, 224), (3, 3)), ((448, 672), (3, 3)), ((224, 28), (3, 0))])
def test_swin_shift_mask_matches_its_definition(size: tuple[int, int], shifts: tuple[int, int]) -> None:
    """-100 between tokens of a window that came from different regions of the unshifted map, else 0 (an axis
    that is not shifted is one region)."""
    from blockgraph.layers.swin import shift_mask

    h, w = size[0] // 4, size[1] // 4
    window = 7
    mask = shift_mask(h, w, window, shifts)
    region = torch.zeros(h, w, dtype=torch.long)
    for i in range(h):
        for j in range(w):  # the region of pixel (i, j) of the shifted map, from first principles
            ri = 0 if i < h - window else (1 if i < h - shifts[0] else 2)
            rj = 0 if j < w - window else (1 if j < w - shifts[1] else 2)
            region[i, j] = (3 * ri if shifts[0] else 0) + (rj if shifts[1] else 0)
    k = 0
    for wi in range(h // window):
        for wj in range(w // window):
            labels = region[wi * window : (wi + 1) * window, wj * window : (wj + 1) * window].reshape(-1)
            expected = (labels[:, None] != labels[None, :]).float() * -100.0
            assert torch.equal(mask[k], expected)
            k += 1
    assert k == mask.shape[0]


def test_the_stated_sizes_are_exactly_those_torch_can_run() -> None:
    """Switch our input check off: a meta-device forward then succeeds at every size validate accepts and fails in
    torch itself (a window view that does not fit) at every size it rejects."""
    model = bg.build_model(HYBRID, device="meta")
    acceptance = model.inference.acceptance
    model._reject = lambda x: None  # bypass the generated check, to test the statement against torch itself
    for h in range(96, 240):
        accepted = acceptance.contains({"H": h, "W": 112})
        try:
            model(torch.empty(1, 3, h, 112, device="meta"))
            ran = True
        except RuntimeError:
            ran = False
        assert ran == accepted, h


def test_mobilevit_transformer_linears_are_drawn_once_from_normal_0_01() -> None:
    """timm's ByobNet init (normal(0, 0.01)) for the transformer's Linear layers, drawn once: the ViT-family
    truncated normal (std 0.02) is skipped inside the block and applies again outside it."""
    from blockgraph.layers import common
    from blockgraph.layers.mobilevit import MobileVitBlock

    torch.manual_seed(0)
    block = MobileVitBlock(64, 96, layers=2)
    weights = torch.cat([m.weight.flatten() for m in block.transformer.modules() if isinstance(m, torch.nn.Linear)])
    assert abs(weights.std().item() - 0.01) < 5e-4
    assert not common._init_skipped
    layer = common.init_linear(torch.nn.Linear(512, 512))
    assert abs(layer.weight.std().item() - 0.02) < 1e-3
