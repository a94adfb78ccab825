"""Dead tokens: a node whose every reader reads only its leading (cls) tokens computes those alone (ViT's and
CoaT-Lite's last block, read by a head on the cls token). Which nodes are trimmed, and that a trimmed model computes
what the untrimmed one does: outputs and gradients, eval (fused kernels) and training, float32 and float64."""

from __future__ import annotations

import pytest
import torch

import blockgraph as bg
from blockgraph.blocks.coat import SerialBlockSpec
from blockgraph.blocks.vit import VitBlockSpec
from tests.conftest import ROOT

VIT = """
name: tiny_vit
input: {name: image, channels: 3, size: [32, 32]}
variables: {dim: 32, pool: token}
blocks:
  - {name: patch_embed, op: conv_patch_embed, dim: 32, patch: 8, norm: false}
  - {name: cls, op: insert_cls_token, dim: 32}
  - {name: pos, op: pos_embed, dim: 32, grid: [4, 4]}
  - {name: blocks, op: vit_block, depth: 3, dim: 32, heads: 4}
  - {name: head, op: cls_head, dim: 32, num_classes: 5, pool: "${pool}"}
  - {name: avg, op: cls_head, from: blocks, dim: 32, num_classes: 0, pool: avg}
  - {name: to_map, op: tokens_to_map, from: blocks, drop_extra: true}
outputs: {logits: head, pooled: avg}
features: {last: {from: to_map, stride: 8}}
default_outputs: [logits]
"""


def _untrimmed(monkeypatch: pytest.MonkeyPatch, build, *args, **kwargs):
    """The same model built with no block able to trim (what the compiler built before it trimmed)."""
    with monkeypatch.context() as patch:
        patch.setattr(VitBlockSpec, "trims_tokens", False)
        patch.setattr(SerialBlockSpec, "trims_tokens", False)
        return build(*args, **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "trimmed"),
    [
        ("vit_tiny_patch16_224", {}, {"blocks.11": 1}),
        ("deit_base_distilled_patch16_224", {}, {"blocks.11": 2}),  # the head reads cls and dist
        ("coat_lite_tiny", {}, {"stage4.blocks.1": 1}),
        ("coat_lite_tiny", {"outputs": ["stage4", "logits"]}, {}),  # the stage4 map reads every token
        ("coat_lite_tiny", {"features_only": True}, {}),
        ("coat_tiny", {}, {}),  # parallel blocks: no trim
        ("swin_tiny_patch4_window7_224", {}, {}),  # no cls token
    ],
)
def test_which_nodes_are_trimmed(name: str, kwargs: dict, trimmed: dict) -> None:
    model = bg.create_model(name, device="meta", **kwargs)
    assert model.trimmed_tokens == trimmed
    for node, keep in trimmed.items():
        assert model.get_submodule(node).keep == keep
        assert sum(f"computes its first {keep} token(s) only" in line for line in model.code.splitlines()) == 1


def test_every_reader_must_read_only_leading_tokens() -> None:
    assert bg.build_model(VIT, device="meta").trimmed_tokens == {"blocks.2": 1}
    assert bg.build_model(VIT, overrides={"pool": "avg"}, device="meta").trimmed_tokens == {}
    assert bg.build_model(VIT, outputs=["logits", "pooled"], device="meta").trimmed_tokens == {}  # avg reads all
    assert bg.build_model(VIT, outputs=["logits", "last"], device="meta").trimmed_tokens == {}  # the map too
    # a returned node is never trimmed, even if its readers would allow it
    spec = VIT.replace("default_outputs: [logits]", "default_outputs: [logits, tokens]").replace(
        "outputs: {logits: head,", "outputs: {tokens: blocks, logits: head,"
    )
    model = bg.build_model(spec, device="meta")
    assert model.trimmed_tokens == {}
    assert model.get_submodule("blocks.2").keep is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", ["vit", "coat_lite"])
def test_a_trimmed_model_computes_what_the_full_one_does(
    monkeypatch: pytest.MonkeyPatch, family: str, dtype: torch.dtype
) -> None:
    """Same weights, same input: the same logits (eval under no_grad runs the fused kernels; with grad enabled the
    plain path) and, in training, the same gradient for every parameter."""
    if family == "vit":
        spec, size, overrides = VIT, 32, {}
    else:
        spec, size, overrides = ROOT / "specs" / "coat_lite_tiny.yaml", 64, {"depths": [1, 1, 1, 2]}
    kwargs = {"dtype": dtype, "overrides": overrides}
    torch.manual_seed(0)
    model = bg.build_model(spec, **kwargs)
    full = _untrimmed(monkeypatch, bg.build_model, spec, **kwargs)
    full.load_state_dict(model.state_dict())
    assert model.trimmed_tokens and not full.trimmed_tokens
    x = torch.randn(3, 3, size, size, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    model.eval(), full.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), full(x), atol=tol, rtol=0)
    torch.testing.assert_close(model(x), full(x), atol=tol, rtol=0)
    model.train(), full.train()
    model(x).square().sum().backward()
    full(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), full.parameters(), strict=True):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, atol=tol * max(scale, 1.0), rtol=0, msg=name)


def test_deit_training_pair_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeiT in training returns (cls logits, dist logits): both from the two tokens its last block keeps."""
    overrides = {"depth": 2, "dim": 32, "heads": 2, "grid": [2, 2]}
    torch.manual_seed(0)
    model = bg.create_model("deit_base_distilled_patch16_224", overrides=overrides, num_classes=7).train()
    full = _untrimmed(
        monkeypatch, bg.create_model, "deit_base_distilled_patch16_224", overrides=overrides, num_classes=7
    ).train()
    full.load_state_dict(model.state_dict())
    assert model.trimmed_tokens == {"blocks.1": 2}
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(model(x), full(x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
