"""The `attention` op: timm's ViT and PVT-v2 attention reproduced with their weights, static shapes and parameter
counts equal to the module's, gradients everywhere, errors at validate, and the op inside a compiled spec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import blockgraph as bg
from blockgraph.blocks import BuildContext
from blockgraph.blocks.attention import AttentionSpec
from blockgraph.types import TensorType

DIM, HEADS = 32, 4


def _timm_vit(**kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from tests.support.timm_oracle import import_timm

        import_timm()
        from timm.models.vision_transformer import Attention

        return Attention(DIM, HEADS, norm_layer=nn.LayerNorm, **kw)

    return make


def _timm_pvt(**kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from tests.support.timm_oracle import import_timm

        import_timm()
        from timm.models.pvt_v2 import Attention

        return Attention(DIM, HEADS, **kw)

    return make


# name: (our fields, timm's module, whether the tokens carry a cls token)
CASES: dict[str, tuple[dict[str, Any], Callable[[], nn.Module], bool]] = {
    "vit": ({}, _timm_vit(qkv_bias=True), True),
    "vit_no_bias": ({"qkv_bias": False}, _timm_vit(qkv_bias=False), True),
    "vit_qk_norm": ({"qk_norm": True}, _timm_vit(qkv_bias=True, qk_norm=True), True),
    "pvt_sr1": ({"qkv": "split"}, _timm_pvt(sr_ratio=1), False),
    "pvt_sr2": ({"qkv": "split", "sr_ratio": 2}, _timm_pvt(sr_ratio=2), False),
    "pvt_sr8": ({"qkv": "split", "sr_ratio": 8}, _timm_pvt(sr_ratio=8), False),
    "pvt_linear": ({"qkv": "split", "kv_pool": 7}, _timm_pvt(linear_attn=True, sr_ratio=8), False),
}


def _spec_text(fields: dict[str, Any], cls: bool, size: tuple[int, int] = (32, 48), patch: int = 2) -> str:
    """A spec: patch embedding, a cls token if ``cls``, then the attention node ``attn`` with ``fields``."""
    attn = {"dim": DIM, "heads": HEADS, **fields}
    blocks = [f"  - {{name: embed, op: conv_patch_embed, dim: {DIM}, patch: {patch}}}"]
    if cls:
        blocks.append(f"  - {{name: cls, op: insert_cls_token, dim: {DIM}}}")
    text = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in attn.items())
    blocks.append(f"  - {{name: attn, op: attention, {text}}}")
    head = ["name: attention_test", f"input: {{channels: 3, size: [{size[0]}, {size[1]}]}}", "blocks:"]
    return "\n".join([*head, *blocks, "outputs: {tokens: attn}"])


@pytest.mark.timm
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_timm_with_its_weights(case: str, train: bool) -> None:
    fields, timm_module, cls = CASES[case]
    torch.manual_seed(0)
    theirs = timm_module().train(train)
    h, w = 16, 12
    spec = AttentionSpec.model_validate({"op": "attention", "dim": DIM, "heads": HEADS, **fields})
    ours = spec.build(BuildContext("attn"), TensorType.tokens(DIM, h, w, extra=int(cls))).train(train)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # the same keys, in timm's order
    x = torch.randn(2, int(cls) + h * w, DIM)
    size = [(h, w)] if spec.takes_size() else []
    with torch.no_grad():
        expected = theirs(x, [h, w]) if case.startswith("pvt") else theirs(x)
        torch.testing.assert_close(ours(x, *size), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_static_shapes_params_and_gradients(case: str) -> None:
    fields, _, cls = CASES[case]
    text = _spec_text(fields, cls)
    torch.manual_seed(0)
    model = bg.build_model(text)
    static = model.node_types()["attn"]
    for h, w in [(32, 48), (64, 32)]:
        bg.validate(text, input_size=(h, w))
        out = model(torch.randn(2, 3, h, w))
        assert tuple(out.shape) == static.shape({"H": h, "W": w}, batch=2)
    attn = model.get_submodule("attn")
    spec = AttentionSpec.model_validate({"op": "attention", "dim": DIM, "heads": HEADS, **fields})
    assert spec.params(static) == sum(p.numel() for p in attn.parameters())
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


ERRORS = [  # our fields, a cls token, the error at 32x48
    ({"heads": 5}, False, r"dim 32 is not divisible by heads 5.*counts that divide 32: 1, 2, 4, 8, 16, 32"),
    ({"qkv": "split", "sr_ratio": 2}, True, r"carry 1 extra token.*remove_cls_token.*`sr_ratio: 1`"),
    ({"qkv": "split", "kv_pool": 7}, True, r"carry 1 extra token.*`kv_pool: null`"),
    ({"sr_ratio": 2}, False, r"`qkv: fused` computes them together.*set `qkv: split`"),
    ({"qkv": "split", "kv_pool": 7, "sr_ratio": 2}, False, r"in place of the spatial reduction.*`sr_ratio: 1`"),
    (
        {"qkv": "split", "sr_ratio": 32},
        False,
        r"input 32x48: the map \(H//2\) is smaller than the kernel window 32.*accepts any H, W >= 64",
    ),
]


@pytest.mark.parametrize("fields, cls, match", ERRORS, ids=[m.split(".*")[0][:30] for *_, m in ERRORS])
def test_errors(fields: dict[str, Any], cls: bool, match: str) -> None:
    with pytest.raises(bg.ShapeError, match=f"(?s){match}"):
        bg.validate(_spec_text(fields, cls), input_size=(32, 48))


BLOCK = """
name: pvt_like
input: {channels: 3, size: [64, 64]}
blocks:
  - {name: embed, op: conv_patch_embed, dim: 32, patch: 4, norm: true}
  - {name: attn, op: attention, dim: 32, heads: 2, qkv: split, sr_ratio: 4}
  - {name: mlp, op: mlp, dim: 32, mlp_ratio: 2}
  - {name: head, op: cls_head, dim: 32, num_classes: 3, pool: avg}
outputs: {logits: head}
"""


def test_in_a_spec_compiled_equals_eager() -> None:
    torch.manual_seed(0)
    model = bg.build_model(BLOCK).eval()
    assert "self.attn(embed, size_1)" in model.code
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert eager.shape == (2, 3)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
